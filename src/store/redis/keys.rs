//! Key and channel names (all under `redis.key_prefix`, `presence:` by default). Braces
//! mark hash tags: on a Redis Cluster every key and channel of one user (`{<id>}`) lives
//! in one slot, so a user's record and its events channel are on the same shard.
//!
//! | name | type | holds |
//! |---|---|---|
//! | `<p>user:{<id>}` | hash | `v`: the user's state (JSON), `v#`: its revision |
//! | `<p>leases` | hash | `<node>`: the node's lease (JSON), `<node>#`: its revision |
//! | `<p>instances` | hash | `<instance>`: a gateway instance lease's deadline (ms), `<instance>#`: revision |
//! | `<p>owners:{<node>}` | hash | `<user>`: a user the node holds sessions of, `<user>#`: revision |
//! | `<p>{dir}` | hash | `<table>.<key>`: a directory row, `<table>.<key>#`: its revision, `#seq` |
//! | `<p>{dir}:log` | stream | directory changes (`row`, `value`, `rev`), for other nodes |
//! | `<p>events` | stream | every presence event (`type`, `user_id`, `event`: JSON) |
//! | `<p>events:{<id>}` | channel | the user's events (sharded on a cluster) |
//! | `<p>{typing}` | channel | typing indicators, to every node |
//! | `<p>node:{<node>}` | channel | requests to a node (forwarded heartbeats) |
//! | `<p>{sync}` | channel | a node's notice that it wrote its sessions back |

pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    pub fn user(&self, id: &str) -> String {
        format!("{}user:{{{id}}}", self.prefix)
    }

    pub fn leases(&self) -> String {
        format!("{}leases", self.prefix)
    }

    /// Gateway instance leases: one hash, a field per instance.
    pub fn instances(&self) -> String {
        format!("{}instances", self.prefix)
    }

    pub fn owners(&self, node: &str) -> String {
        format!("{}owners:{{{node}}}", self.prefix)
    }

    pub fn dir(&self) -> String {
        format!("{}{{dir}}", self.prefix)
    }

    pub fn dir_log(&self) -> String {
        format!("{}{{dir}}:log", self.prefix)
    }

    pub fn events_stream(&self) -> String {
        format!("{}events", self.prefix)
    }

    pub fn events_channel(&self, id: &str) -> String {
        format!("{}events:{{{id}}}", self.prefix)
    }

    pub fn events_channel_prefix(&self) -> String {
        format!("{}events:{{", self.prefix)
    }

    pub fn typing_channel(&self) -> String {
        format!("{}{{typing}}", self.prefix)
    }

    pub fn inbox(&self, node: &str) -> String {
        format!("{}node:{{{node}}}", self.prefix)
    }

    pub fn sync_channel(&self) -> String {
        format!("{}{{sync}}", self.prefix)
    }
}

/// The hash slot of a key or channel (CRC16 of its hash tag, or of the whole name).
#[cfg(test)]
fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tag = match b.iter().position(|c| *c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|c| *c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    let mut crc: u16 = 0;
    for byte in tag {
        crc ^= (*byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_record_and_channel_share_a_slot_and_the_directory_keys_too() {
        let k = Keys::new("presence:");
        for id in ["alice", "tenant:bob@x.io", "a.b+c"] {
            assert_eq!(slot(&k.user(id)), slot(&k.events_channel(id)), "{id}");
            assert!(k.events_channel(id).starts_with(&k.events_channel_prefix()));
        }
        assert_eq!(slot(&k.dir()), slot(&k.dir_log()));
        assert_ne!(k.events_stream(), k.events_channel("x"));
        // The reference value from the Redis Cluster specification.
        assert_eq!(slot("123456789"), 0x31C3);
    }
}
