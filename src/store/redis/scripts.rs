//! The Lua scripts, one per mutation, by name. Each writes the record,
//! the index, the event stream entry and the publish together, so no reader
//! can see a new state without its event being on the stream. Every key a
//! script touches is declared in KEYS and lies in one partition (one hash
//! slot on Redis Cluster); the pub/sub channel, not a key, is an argument.

use redis::Script;

const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'v', ARGV[2], 't', ARGV[3])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
local sid = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'key_id', ARGV[4])
redis.call('PUBLISH', ARGV[6], sid .. ' ' .. ARGV[4])
return sid
"#;

const UPDATE: &str = r#"
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return -1 end
if v ~= ARGV[3] then return -2 end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 'v', ARGV[2])
local sid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'key_id', ARGV[4])
redis.call('PUBLISH', ARGV[6], sid .. ' ' .. ARGV[4])
return 1
"#;

const DELETE: &str = r#"
local t = redis.call('HGET', KEYS[1], 't')
if not t then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], t)
redis.call('HDEL', KEYS[3], ARGV[1])
local sid = redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[2], '*', 'key_id', ARGV[1])
redis.call('PUBLISH', ARGV[3], sid .. ' ' .. ARGV[1])
return 1
"#;

// KEYS[1] is the partition's last-used hash, KEYS[i + 1] the record of the
// i-th (key_id, second) pair in ARGV.
const TOUCH: &str = r#"
for i = 1, #ARGV / 2 do
  local id, at = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if redis.call('EXISTS', KEYS[i + 1]) == 1 then
    local cur = tonumber(redis.call('HGET', KEYS[1], id) or '0')
    if at > cur then redis.call('HSET', KEYS[1], id, at) end
  end
end
return 1
"#;

// KEYS[1] the tenant's policy, KEYS[2] its partition's stream. An empty
// policy (ARGV[1] = '') removes it.
const SET_TENANT: &str = r#"
if ARGV[1] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[1]) end
local sid = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'tenant', ARGV[2])
redis.call('PUBLISH', ARGV[4], sid .. ' tenant=' .. ARGV[2])
return 1
"#;

// One shared GCRA bucket (README, "Rate limits", fleet-wide), on Redis's
// own clock so that replicas' clocks never matter. KEYS[1] holds the
// theoretical arrival time in whole microseconds, always rounded up (a
// double holds today's microseconds exactly; rounding up never hands out a
// fraction of a cell). ARGV: period (µs, may be fractional), capacity (µs:
// burst × period), cells wanted, the least worth granting, cells given back
// first. Answers {granted, cells left, ms until whole, ms until `min`
// cells are there when none were granted, ms until one cell is there}.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local period = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local min = tonumber(ARGV[4])
local back = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
if back > 0 then tat = math.max(now, math.ceil(tat - back * period)) end
local avail = math.floor((cap - (tat - now)) / period + 1e-9)
if avail < 0 then avail = 0 end
local one = 0
if avail < 1 then one = math.max(1, math.ceil((tat + period - cap - now) / 1000)) end
local granted = 0
if avail >= min and want > 0 then granted = math.min(want, avail) end
tat = math.ceil(tat + granted * period)
local ahead = tat - now
if ahead > 0 then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil(ahead / 1000) + 1000)
else
  redis.call('DEL', KEYS[1])
end
local retry = 0
if granted < min then retry = math.max(1, math.ceil((tat + min * period - cap - now) / 1000)) end
return {granted, avail - granted, math.ceil(ahead / 1000), retry, one}
"#;

// KEYS[1] the sorted set of live replicas (score: last heard, ms).
// ARGV: this replica's id, how long a replica counts as live (ms).
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// Every script, loaded once per store.
pub struct Scripts {
    pub create: Script,
    pub update: Script,
    pub delete: Script,
    pub touch: Script,
    pub set_tenant: Script,
    pub lease: Script,
    pub heartbeat: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create: Script::new(CREATE),
            update: Script::new(UPDATE),
            delete: Script::new(DELETE),
            touch: Script::new(TOUCH),
            set_tenant: Script::new(SET_TENANT),
            lease: Script::new(LEASE),
            heartbeat: Script::new(HEARTBEAT),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}
