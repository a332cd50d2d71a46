//! Code generated from `proto/keystile/v1/*.proto`. Nothing outside
//! `service/` and the CLI client should need it.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

tonic::include_proto!("keystile.v1");

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keystile_descriptor");

// The full key is a secret: these three Debug impls leave it out.

impl std::fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest")
            .field("key", &"<redacted>")
            .field("ip", &self.ip)
            .field("scopes", &self.scopes)
            .field("tenant", &self.tenant)
            .field("cost", &self.cost)
            .finish()
    }
}

impl std::fmt::Debug for CreateKeyResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateKeyResponse").field("key", &"<redacted>").field("record", &self.record).finish()
    }
}

impl std::fmt::Debug for RotateKeyResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateKeyResponse")
            .field("key", &"<redacted>")
            .field("record", &self.record)
            .field("previous", &self.previous)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_a_key() {
        let key = "ks_live_7Hq2mZp0_Vb3kR9sT1uXw4yZa6cDe8fGh0jKm2nPq3xQ0Lw";
        let shown = [
            format!("{:?}", VerifyRequest { key: key.into(), ..Default::default() }),
            format!("{:?}", CreateKeyResponse { key: key.into(), record: None }),
            format!("{:?}", RotateKeyResponse { key: key.into(), record: None, previous: None }),
        ];
        for s in shown {
            assert!(!s.contains("Vb3kR9sT"), "{s}");
        }
    }
}
