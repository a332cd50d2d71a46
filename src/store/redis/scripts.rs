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

/// Every script, loaded once per store.
pub struct Scripts {
    pub create: Script,
    pub update: Script,
    pub delete: Script,
    pub touch: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            create: Script::new(CREATE),
            update: Script::new(UPDATE),
            delete: Script::new(DELETE),
            touch: Script::new(TOUCH),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}
