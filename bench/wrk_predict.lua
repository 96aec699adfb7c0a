-- wrk script for `make serve-bench`: POST one text per request to /predict, cycling through a file
-- of JSON bodies (one per line), count answers by HTTP status, and optionally pace requests.
--
--   wrk -t1 -c64 -d10s --latency -s bench/wrk_predict.lua http://127.0.0.1:8000 -- BODIES RATE [KEY] [ARRIVALS]
--
-- RATE 0: closed loop (each connection sends its next request as soon as the answer arrives).
-- RATE R > 0: each thread schedules arrivals at R requests/s, evenly spaced (ARRIVALS "uniform", the
-- default, as wrk2 and vegeta pace) or with exponential gaps ("poisson"); a free connection sends at
-- the next scheduled time, so the offered load does not drop when the server slows down (as long as
-- a connection is free; a schedule more than 1 s behind is reset). wrk's latency is measured from
-- the request's write, so it excludes the pacing delay.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } edgeft_timespec;
int clock_gettime(int clk_id, edgeft_timespec *tp);
]]
local ts = ffi.new("edgeft_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local threads = {}
function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, rate, key = args[1], tonumber(args[2] or "0"), args[3]
  poisson = (args[4] == "poisson")
  local headers = { ["Content-Type"] = "application/json" }
  if key ~= nil and key ~= "" then headers["Authorization"] = "Bearer " .. key end
  reqs = {}
  for line in io.lines(path) do
    reqs[#reqs + 1] = wrk.format("POST", "/predict", headers, line)
  end
  pos = ((tid or 0) * 7919) % #reqs -- threads start at different texts
  counts = {}
  interval_ms = (rate > 0) and (1000.0 / rate) or 0
  next_ms = nil
  math.randomseed(12345 + (tid or 0))
end

function request()
  pos = pos % #reqs + 1
  return reqs[pos]
end

function delay()
  if interval_ms == 0 then return 0 end
  local t = now_ms()
  if next_ms == nil or next_ms < t - 1000 then next_ms = t end
  local slot = next_ms
  if poisson then
    next_ms = next_ms - math.log(1 - math.random()) * interval_ms
  else
    next_ms = next_ms + interval_ms
  end
  if slot <= t then return 0 end
  return math.floor(slot - t + 0.5)
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local agg = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c ~= nil then
      for k, v in pairs(c) do agg[tostring(k)] = (agg[tostring(k)] or 0) + v end
    end
  end
  local parts = {}
  for k, v in pairs(agg) do parts[#parts + 1] = string.format('"%s": %d', k, v) end
  local e = summary.errors
  io.write(string.format(
    'EDGEFT_WRK {"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}, "latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}, ' ..
    '"status": {%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    table.concat(parts, ", ")))
end
