-- wrk report script: prints one machine-readable line after the run.
-- Latency values are in microseconds (wrk's native unit).
done = function(summary, latency, requests)
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    "BENCH rps=%.1f p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f requests=%d " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests / secs,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    summary.requests, e.connect, e.read, e.write, e.status, e.timeout))
end
