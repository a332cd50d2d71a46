//! Code generated from `proto/keystile/v1/*.proto`. Nothing outside
//! `service/` and the CLI client should need it.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

tonic::include_proto!("keystile.v1");

/// The encoded descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keystile_descriptor");

// The full key is a secret: these Debug impls leave it out.
crate::secret::debug_without_key!(VerifyRequest, "VerifyRequest", [ip, scopes, tenant, cost]);
crate::secret::debug_without_key!(CreateKeyResponse, "CreateKeyResponse", [record]);
crate::secret::debug_without_key!(RotateKeyResponse, "RotateKeyResponse", [record, previous]);
crate::secret::debug_without_key!(ExchangeRequest, "ExchangeRequest", [email, scopes, ttl_seconds]);
crate::secret::debug_without_key!(ExchangeResponse, "ExchangeResponse", [expires_in, token_type]);

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
