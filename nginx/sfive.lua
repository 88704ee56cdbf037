-- sfive.lua: the nginx-lua exporter of sfive-ngxlua.
--
-- Log phase (M.log): every finished request becomes one JSON line
--   {"seq":N,"time":"...","client":"...","ua":"...","url":"...","status":200,"bytes-sent":1234}
-- stored in a ring of `ring_size` slots in an ngx.shared dict (slot = seq % ring_size). The
-- sequence number comes from an atomic incr, so all workers share one ordered stream.
--
-- Content phase (M.serve): streams the ring to a subscriber, from "now" or from ?after=N, with
-- its own cursor, so any number of subscribers each see every line in order. A subscriber that
-- fell behind the ring gets a gap line {"lost":K,"seq":S} (records S-K .. S-1 are gone, S comes
-- next). Memory stays bounded: the ring overwrites its oldest slots, and a slow subscriber only
-- holds one batch (ngx.flush(true) waits for the socket without blocking the worker).
--
-- Protocol 2 (GET /sfive?v=2[&after=N][&ring=ID]): every response carries X-Sfive-Protocol: 2
-- and X-Sfive-Ring: ID, the ring's identity (16 hex digits, made once per shared dict with
-- dict:add, so a reload keeps it and a restart makes a new one). ?ring=ID naming another ring
-- starts from the first record this ring holds. A v=2 subscriber also gets heartbeat lines
-- {"seq":S,"hb":T} at least every heartbeat_interval: it has everything up to S, and every record
-- whose time is before T (epoch seconds) has been delivered at or before S. When the worker
-- exits (reload, quit), a stream first drains what the other workers still log.
--
-- Works with lua-nginx-module >= 0.10.6 (Debian bookworm's libnginx-mod-http-lua 0.10.23) and
-- OpenResty. Needs no Lua library besides the module itself.

local ngx = ngx
local shared = ngx.shared
local byte, find, format, gsub, match, sub =
    string.byte, string.find, string.format, string.gsub, string.match, string.sub
local concat = table.concat
local floor = math.floor
local os_date = os.date
local pairs, tonumber, tostring, type = pairs, tonumber, tostring, type

local M = { _VERSION = "1.0" }

local SEQ_KEY = "seq"
local RING_KEY = "ring"
local PROTOCOL = 2

-- How long after its time a record may become visible in the ring at most (a worker's cached
-- clock lags the real one by its event-loop iteration): heartbeats promise T = now - this.
local CLOCK_SLACK = 0.3

local config = {
    dict = "sfive",          -- name of the lua_shared_dict holding the ring
    ring_size = 100000,      -- records held for subscribers that fall behind or reconnect
    poll_interval = 0.05,    -- seconds a caught-up subscriber sleeps between polls
    batch_max = 1000,        -- most records sent with one ngx.print / ngx.flush
    pending_timeout = 1,     -- seconds to wait for a counted but unwritten slot before skipping it
    heartbeat_interval = 0.25,  -- seconds between heartbeat lines to a v=2 subscriber, at most
    drain_quiet = 0.2,       -- at a worker's exit, a stream ends once no record came for this long
    drain_max = 2,           -- ... or after this long at most
}

local function check(cond, msg)
    if not cond then
        error("sfive: " .. msg, 3)
    end
end

local function is_int(v, min)
    return type(v) == "number" and v == floor(v) and v >= min and v < 2 ^ 53
end

--- Set knobs (call from init_by_lua*); unknown names and bad values are errors.
function M.configure(opts)
    check(opts == nil or type(opts) == "table", "configure() takes a table of options")
    for k, v in pairs(opts or {}) do
        check(config[k] ~= nil, "unknown option '" .. tostring(k) .. "'")
        config[k] = v
    end
    check(type(config.dict) == "string" and config.dict ~= "", "dict must be a dict name")
    check(is_int(config.ring_size, 1), "ring_size must be an integer >= 1")
    check(type(config.poll_interval) == "number" and config.poll_interval >= 0.001,
          "poll_interval must be a number of seconds >= 0.001")
    check(is_int(config.batch_max, 1), "batch_max must be an integer >= 1")
    check(type(config.pending_timeout) == "number" and config.pending_timeout > 0,
          "pending_timeout must be a number of seconds > 0")
    check(type(config.heartbeat_interval) == "number" and config.heartbeat_interval >= 0.01,
          "heartbeat_interval must be a number of seconds >= 0.01")
    check(type(config.drain_quiet) == "number" and config.drain_quiet >= 0,
          "drain_quiet must be a number of seconds >= 0")
    check(type(config.drain_max) == "number" and config.drain_max >= 0,
          "drain_max must be a number of seconds >= 0")
    local dict = shared[config.dict]
    check(dict ~= nil, "lua_shared_dict '" .. config.dict
          .. "' is not declared; add 'lua_shared_dict " .. config.dict .. " 64m;' to http {}")
    M.ring_id(dict)
    return M
end

local function random_hex(bytes)
    local f = io.open("/dev/urandom", "rb")
    local raw = f and f:read(bytes)
    if f then
        f:close()
    end
    if not raw or #raw ~= bytes then
        math.randomseed(floor(ngx.now() * 1000) + (ngx.worker and ngx.worker.pid() or 0))
        local t = {}
        for i = 1, bytes do
            t[i] = string.char(math.random(0, 255))
        end
        raw = concat(t)
    end
    return (gsub(raw, ".", function(c) return format("%02x", byte(c)) end))
end

--- The ring's identity, made once per shared dict (dict:add: a reload keeps it, a restart of
--- nginx makes a new dict and so a new identity). Also makes sure the sequence counter exists,
--- so that neither key is ever created later, when a full dict could only make room by evicting.
function M.ring_id(dict)
    dict = dict or shared[config.dict]
    local id = dict:get(RING_KEY)
    if id then
        return id
    end
    dict:add(SEQ_KEY, 0)
    dict:add(RING_KEY, random_hex(8))  -- fails harmlessly if another worker was first
    return dict:get(RING_KEY)
end

--- The current knobs (a copy).
function M.settings()
    local copy = {}
    for k, v in pairs(config) do
        copy[k] = v
    end
    return copy
end

-- Time: ISO 8601, local time with offset, millisecond precision. The date part is formatted
-- once per second.
local last_sec, last_date, last_offset

local function iso_time(now)
    local sec = floor(now)
    if sec ~= last_sec then
        last_date = os_date("%Y-%m-%dT%H:%M:%S", sec)
        local z = os_date("%z", sec)
        last_offset = sub(z, 1, 3) .. ":" .. sub(z, 4, 5)
        last_sec = sec
    end
    local ms = floor((now - sec) * 1000 + 0.5)
    if ms > 999 then
        ms = 999
    end
    return format("%s.%03d%s", last_date, ms, last_offset)
end

-- JSON strings. Headers and URIs are arbitrary bytes: invalid UTF-8 becomes U+FFFD so that
-- every line is valid JSON text; control characters, '"' and '\' are escaped.
local ESCAPES = {
    ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
    ['\b'] = '\\b', ['\f'] = '\\f',
}

local function escape_char(c)
    return ESCAPES[c] or format("\\u%04x", byte(c))
end

local function utf8_len(s, i, len)
    local c = byte(s, i)
    local n
    if c >= 0xC2 and c <= 0xDF then
        n = 2
    elseif c >= 0xE0 and c <= 0xEF then
        n = 3
    elseif c >= 0xF0 and c <= 0xF4 then
        n = 4
    else
        return nil
    end
    if i + n - 1 > len then
        return nil
    end
    for k = 1, n - 1 do
        local cc = byte(s, i + k)
        if cc < 0x80 or cc > 0xBF then
            return nil
        end
    end
    local c2 = byte(s, i + 1)
    if (c == 0xE0 and c2 < 0xA0) or (c == 0xED and c2 > 0x9F)
            or (c == 0xF0 and c2 < 0x90) or (c == 0xF4 and c2 > 0x8F) then
        return nil  -- overlong form, surrogate, or beyond U+10FFFF
    end
    return n
end

local function utf8_clean(s)
    local parts, np, i, len, run = {}, 0, 1, #s, 1
    while i <= len do
        if byte(s, i) < 0x80 then
            i = i + 1
        else
            local n = utf8_len(s, i, len)
            if n then
                i = i + n
            else
                parts[np + 1] = sub(s, run, i - 1)
                parts[np + 2] = "\239\191\189"
                np = np + 2
                i = i + 1
                run = i
            end
        end
    end
    if np == 0 then
        return s
    end
    parts[np + 1] = sub(s, run)
    return concat(parts)
end

local function json_string(s)
    if s == nil then
        return '""'
    end
    if find(s, '[%z\1-\31"\\\128-\255]') then
        if find(s, "[\128-\255]") then
            s = utf8_clean(s)
        end
        s = gsub(s, '[%z\1-\31"\\]', escape_char)
    end
    return '"' .. s .. '"'
end

M.json_string = json_string

local warned = {}

local function warn_once(key, ...)
    if not warned[key] then
        warned[key] = true
        ngx.log(ngx.WARN, "sfive: ", ...)
    end
end

--- Log phase: append the finished request to the ring. Never yields, never blocks.
function M.log()
    local dict = shared[config.dict]
    if not dict then
        return warn_once("nodict", "lua_shared_dict '", config.dict,
                         "' is not declared; requests are not exported")
    end
    local var = ngx.var
    local body = ',"time":"' .. iso_time(ngx.now())
        .. '","client":' .. json_string(var.remote_addr)
        .. ',"ua":' .. json_string(var.http_user_agent)
        .. ',"url":' .. json_string(var.uri)
        .. ',"status":' .. (tonumber(var.status) or 0)
        .. ',"bytes-sent":' .. (tonumber(var.bytes_sent) or 0) .. '}'
    local seq, err = dict:incr(SEQ_KEY, 1, 0)
    if not seq then
        return ngx.log(ngx.ERR, "sfive: cannot number a record: ", err)
    end
    -- safe_set never evicts: a dict too small for its ring loses this record (subscribers get a
    -- gap line for it) instead of evicting the ring's identity, its counter or older records
    local ok
    ok, err = dict:safe_set(seq % config.ring_size, format('{"seq":%d', seq) .. body)
    if not ok then
        if err == "no memory" then
            return warn_once("small", "lua_shared_dict '", config.dict, "' is too small for ",
                             "ring_size ", config.ring_size, ": records are lost (first: ", seq,
                             "); make the dict larger")
        end
        return ngx.log(ngx.ERR, "sfive: cannot store record ", seq, ": ", err)
    end
end

local function gap_line(lost, next_seq)
    return format('{"lost":%d,"seq":%d}', lost, next_seq)
end

-- Epoch seconds of a record line's "time" (local time with its UTC offset, milliseconds).
local function days_from_civil(y, m, d)
    y = m <= 2 and y - 1 or y
    local era = floor(y / 400)
    local yoe = y - era * 400
    local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

local function line_time(line)
    local y, mo, d, h, mi, sec, ms, sign, oh, om = match(line,
        '"time":"(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)%.(%d+)([+-])(%d+):(%d+)"')
    if not y then
        return nil
    end
    local offset = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "-" and -1 or 1)
    return days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
        + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec) + tonumber(ms) / 1000 - offset
end

M.line_time = line_time

local function on_abort()
    ngx.exit(499)
end

local function bad_request(msg)
    ngx.status = ngx.HTTP_BAD_REQUEST
    ngx.header.content_type = "text/plain"
    ngx.say("sfive: ", msg)
    return ngx.exit(ngx.HTTP_BAD_REQUEST)
end

--- Content phase: stream records to this subscriber until it disconnects or the worker exits
--- (nginx reload); a subscriber reconnects with ?after=<last seq it got> to lose nothing.
function M.serve()
    local dict = shared[config.dict]
    if not dict then
        ngx.log(ngx.ERR, "sfive: lua_shared_dict '", config.dict, "' is not declared")
        return ngx.exit(ngx.HTTP_INTERNAL_SERVER_ERROR)
    end
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(ngx.HTTP_NOT_ALLOWED)
    end

    local var = ngx.var
    local after, v, want_ring = var.arg_after, var.arg_v, var.arg_ring
    if after ~= nil and (not match(after, "^%d+$") or #after > 15) then
        return bad_request("'after' must be a sequence number (a non-negative integer)")
    end
    if v ~= nil and (not match(v, "^%d+$") or #v > 5) then
        return bad_request("'v' must be a protocol version (a positive integer)")
    end
    if want_ring ~= nil and not match(want_ring, "^%x+$") then
        return bad_request("'ring' must be a ring identity (hex digits, as X-Sfive-Ring)")
    end
    local v2 = v ~= nil and tonumber(v) >= PROTOCOL

    local ring = config.ring_size
    local batch_max = config.batch_max
    local ring_id = M.ring_id(dict)
    local newest = dict:get(SEQ_KEY) or 0
    local cursor = newest + 1       -- next seq to deliver
    local lost = 0                  -- records skipped since the last delivered one

    if want_ring ~= nil and string.lower(want_ring) ~= ring_id then
        cursor = 1                  -- another ring (nginx restarted): all this one holds
    elseif after ~= nil then
        local n = tonumber(after)
        if n < newest then
            cursor = n + 1
        end
    end

    ngx.header.content_type = "application/x-ndjson"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["X-Accel-Buffering"] = "no"
    ngx.header["X-Sfive-Protocol"] = tostring(PROTOCOL)
    ngx.header["X-Sfive-Ring"] = ring_id
    local ok, err = ngx.on_abort(on_abort)
    if not ok then
        warn_once("abort", "ngx.on_abort: ", err,
                  " (put 'lua_check_client_abort on;' in the sfive location)")
    end
    ngx.send_headers()
    if method == "HEAD" then
        return ngx.exit(ngx.HTTP_OK)
    end
    ok = ngx.flush(true)
    if not ok then
        return
    end

    local out, nout = {}, 0
    local pending_since
    local exiting = ngx.worker.exiting
    local now = ngx.now
    local hb_interval = config.heartbeat_interval
    local next_hb = 0               -- when the next heartbeat is due (v2): at once
    local hb_time = 0               -- the last heartbeat's T (never goes back)
    local last_line                 -- the last record delivered, for its time
    local drain_start, quiet_since, drain_newest
    while true do
        newest = dict:get(SEQ_KEY) or newest
        local oldest = newest - ring + 1
        if cursor < oldest then
            lost = lost + (oldest - cursor)
            cursor = oldest
        end
        local steps = 0
        local waiting = false       -- stopped at a counted but not yet stored record
        while cursor <= newest and steps < batch_max do
            steps = steps + 1
            local line = dict:get(cursor % ring)
            local s = line and tonumber(match(line, '^{"seq":(%d+)'))
            if s == cursor then
                if lost > 0 then
                    nout = nout + 1
                    out[nout] = gap_line(lost, cursor)
                    lost = 0
                end
                nout = nout + 1
                out[nout] = line
                last_line = line
                cursor = cursor + 1
                pending_since = nil
            elseif s and s > cursor then
                -- the ring overwrote this slot: skip to the oldest record still held
                oldest = (dict:get(SEQ_KEY) or newest) - ring + 1
                local skip = oldest > cursor and oldest - cursor or 1
                lost = lost + skip
                cursor = cursor + skip
            else
                -- counted but not yet stored (another worker is between incr and set), or
                -- lost because the dict is too small: wait a little, then skip it
                local t = now()
                pending_since = pending_since or t
                if t - pending_since < config.pending_timeout then
                    waiting = true
                    break
                end
                lost = lost + 1
                cursor = cursor + 1
            end
        end
        local t = now()
        local finished = false
        if drain_start == nil and exiting() then
            drain_start, quiet_since, drain_newest = t, t, newest
        end
        if drain_start ~= nil then
            -- the worker is exiting: go on until the ring has been quiet for a moment
            if newest ~= drain_newest or waiting or cursor <= newest then
                drain_newest, quiet_since = newest, t
            end
            finished = t - quiet_since >= config.drain_quiet
                or t - drain_start >= config.drain_max
        end
        if v2 and lost > 0 and not waiting then
            -- v2 hears of a loss at once (v1 only before the next record, as it always did)
            nout = nout + 1
            out[nout] = gap_line(lost, cursor)
            lost = 0
        end
        if v2 and (t >= next_hb or finished) then
            -- S: the last seq delivered (lost records not yet announced are not "had").
            -- T: caught up, every record numbered later is younger than now - CLOCK_SLACK;
            -- otherwise records after S are younger than S's own time - CLOCK_SLACK.
            local s = cursor - 1 - lost
            local promise
            if cursor > newest and not waiting then
                promise = t - CLOCK_SLACK
            else
                if last_line == nil and s > 0 then
                    local line = dict:get(s % ring)
                    if line and tonumber(match(line, '^{"seq":(%d+)')) == s then
                        last_line = line
                    end
                end
                local lt = last_line and line_time(last_line)
                promise = lt and lt - CLOCK_SLACK
            end
            if promise and promise > hb_time then
                hb_time = floor(promise * 1000) / 1000
            end
            nout = nout + 1
            out[nout] = format('{"seq":%d,"hb":%.3f}', s, hb_time)
            next_hb = t + hb_interval
        end
        if nout > 0 then
            out[nout + 1] = ""
            ok = ngx.print(concat(out, "\n", 1, nout + 1))
            if ok then
                ok = ngx.flush(true)
            end
            for i = 1, nout + 1 do
                out[i] = nil
            end
            nout = 0
            if not ok then
                return
            end
        end
        if finished then
            return
        end
        if steps < batch_max then
            ngx.sleep(config.poll_interval)
        else
            ngx.sleep(0)
        end
    end
end

return M
