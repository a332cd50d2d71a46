//! Token signing keys (README, "Token exchange"): Ed25519 key pairs, each
//! with a `kid`. Generated per deployment and kept in the store with the
//! private half sealed (XChaCha20-Poly1305) under a key derived from the
//! pepper, or read from PKCS#8 PEM files. Neither half of a private key is
//! ever logged: `Debug` shows the `kid` only.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::{DecodingKey, EncodingKey};

use crate::key::{Pepper, PepperSet};
use crate::store::StoredSigningKey;

/// What the sealing key is derived for (one pepper, several purposes).
const SEAL_CONTEXT: &str = "keystile token signing key seal v1";

/// One key pair, ready to sign and verify.
#[derive(Clone)]
pub struct SigningPair {
    pub kid: String,
    /// Unix seconds (0 for a key from a file).
    pub created_at: i64,
    /// The public key, base64url (a JWK's `x`).
    pub public: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for SigningPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningPair(kid={}, {})", self.kid, crate::secret::REDACTED)
    }
}

impl SigningPair {
    fn from_signing_key(kid: String, created_at: i64, key: &SigningKey) -> Result<SigningPair, String> {
        let der = key.to_pkcs8_der().map_err(|e| format!("cannot encode the signing key: {e}"))?;
        let public = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let decoding = DecodingKey::from_ed_components(&public).map_err(|e| e.to_string())?;
        Ok(SigningPair { kid, created_at, public, encoding: EncodingKey::from_ed_der(der.as_bytes()), decoding })
    }

    /// A fresh key pair with a random `kid`.
    pub fn generate(now: i64) -> SigningPair {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS CSPRNG is unavailable");
        let mut id = [0u8; 9];
        getrandom::fill(&mut id).expect("the OS CSPRNG is unavailable");
        let key = SigningKey::from_bytes(&seed);
        SigningPair::from_signing_key(URL_SAFE_NO_PAD.encode(id), now, &key).expect("a fresh key encodes")
    }

    /// A key pair from a PKCS#8 PEM file's text; its `kid` is derived from
    /// the public key, so every replica reading the file agrees on it.
    pub fn from_pem(pem: &str) -> Result<SigningPair, String> {
        let key = SigningKey::from_pkcs8_pem(pem)
            .map_err(|_| "not an Ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519)".to_string())?;
        let digest = blake3::hash(key.verifying_key().as_bytes());
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_bytes()[..9]);
        SigningPair::from_signing_key(kid, 0, &key)
    }

    /// The form the store keeps: the private half sealed under `pepper`.
    pub fn seal(&self, pepper: &Pepper) -> StoredSigningKey {
        let key = SigningKey::from_pkcs8_der(self.encoding.inner()).expect("our own encoding");
        let cipher = XChaCha20Poly1305::new(&pepper.derive_key(SEAL_CONTEXT).into());
        let mut nonce = [0u8; 24];
        getrandom::fill(&mut nonce).expect("the OS CSPRNG is unavailable");
        let sealed = cipher.encrypt(&XNonce::from(nonce), key.to_bytes().as_slice()).expect("sealing a key");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        StoredSigningKey {
            kid: self.kid.clone(),
            created_at: self.created_at,
            public: self.public.clone(),
            sealed: STANDARD.encode(out),
            pepper_id: pepper.id().to_string(),
        }
    }

    /// Opens a stored key with the pepper it was sealed under; the error
    /// names the `kid`, never key material.
    pub fn unseal(stored: &StoredSigningKey, peppers: &PepperSet) -> Result<SigningPair, String> {
        let pepper = peppers.by_id(&stored.pepper_id).ok_or_else(|| {
            format!(
                "signing key {} is sealed under pepper {}, which this sidecar does not have",
                stored.kid, stored.pepper_id
            )
        })?;
        let bad = || format!("signing key {} cannot be opened (damaged, or sealed under another pepper)", stored.kid);
        let raw = STANDARD.decode(&stored.sealed).map_err(|_| bad())?;
        if raw.len() < 24 {
            return Err(bad());
        }
        let cipher = XChaCha20Poly1305::new(&pepper.derive_key(SEAL_CONTEXT).into());
        let nonce: [u8; 24] = raw[..24].try_into().map_err(|_| bad())?;
        let seed = cipher.decrypt(&XNonce::from(nonce), &raw[24..]).map_err(|_| bad())?;
        let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| bad())?;
        let pair =
            SigningPair::from_signing_key(stored.kid.clone(), stored.created_at, &SigningKey::from_bytes(&seed))?;
        if pair.public != stored.public {
            return Err(bad());
        }
        Ok(pair)
    }

    pub fn encoding(&self) -> &EncodingKey {
        &self.encoding
    }

    pub fn decoding(&self) -> &DecodingKey {
        &self.decoding
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> serde_json::Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": self.public, "kid": self.kid, "alg": "EdDSA", "use": "sig"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_under_its_pepper_and_never_shows() {
        let pepper = Pepper::parse(&[9u8; 32]).unwrap();
        let pair = SigningPair::generate(1_800_000_000);
        let stored = pair.seal(&pepper);
        assert!(!stored.sealed.contains(&pair.public));
        let opened = SigningPair::unseal(&stored, &PepperSet::single(pepper)).unwrap();
        assert_eq!((opened.kid.as_str(), opened.public.as_str()), (pair.kid.as_str(), pair.public.as_str()));
        let other = PepperSet::single(Pepper::parse(&[8u8; 32]).unwrap());
        let err = SigningPair::unseal(&stored, &other).unwrap_err();
        assert!(err.contains(&stored.kid) && !err.contains(&stored.sealed));
        let mut damaged = stored.clone();
        damaged.pepper_id = other.current().id().to_string();
        assert!(SigningPair::unseal(&damaged, &other).is_err());
        assert!(!format!("{pair:?} {stored:?}").contains(&stored.sealed));
    }
}
