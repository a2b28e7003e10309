-- wrk script for POST /recommend: each request asks for a different known user.
-- Set by load_test.py through the environment: WRK_USERS (a comma-separated list of user
-- keys), WRK_K (results per request), WRK_EXCLUDE_RATED ("true"/"false").
-- Prints one JSON line at the end (requests, duration, latency percentiles, errors).

local users = {}
for u in string.gmatch(os.getenv("WRK_USERS") or "1", "[^,]+") do
  users[#users + 1] = u
end
local k = os.getenv("WRK_K") or "10"
local exclude_rated = os.getenv("WRK_EXCLUDE_RATED") or "true"
local headers = {["Content-Type"] = "application/json"}
local bodies = {}
for i, u in ipairs(users) do
  local key = tonumber(u) and u or ('"' .. u .. '"')
  bodies[i] = '{"user_id": ' .. key .. ', "k": ' .. k .. ', "exclude_rated": ' ..
      exclude_rated .. '}'
end
local n = 0

function request()
  n = n + 1
  return wrk.format("POST", "/recommend", headers, bodies[(n * 7919) % #bodies + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "non2xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
