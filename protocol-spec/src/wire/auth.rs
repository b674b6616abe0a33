//! Authentication and optional encryption of datagrams.
//!
//! Every datagram ends with a 16-byte tag over header and body. Authenticated-only datagrams use a
//! keyed BLAKE3 MAC truncated to 16 bytes; encrypted ones (`FLAG_ENCRYPTED`) use ChaCha20-Poly1305
//! with the header as associated data and nonce `node u32 | packet_number u64`. Both keys are derived
//! from the 32-byte session key, the session id and the epoch, so a restarted server (new epoch)
//! never reuses a nonce.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};

use super::codec::{peek_header, write_header};
use super::{DecodeError, EncodeError, Header, FLAG_ENCRYPTED, HEADER_LEN, MAX_DATAGRAM, TAG_LEN};

/// BLAKE3 key-derivation context of the MAC key.
const MAC_CONTEXT: &str = "spindrift v1 mac key";
/// BLAKE3 key-derivation context of the encryption key.
const ENC_CONTEXT: &str = "spindrift v1 enc key";

/// The secret shared by the server and the hosts of one session (distributed out of band).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Keys derived for one (session, epoch).
#[derive(Clone)]
pub struct Keys {
    mac: [u8; 32],
    enc: [u8; 32],
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    /// Derives the MAC and encryption keys of `session` at `epoch` from `key`.
    ///
    /// Each key is `blake3::derive_key(context, key || session u64 BE || epoch u32 BE)` with the contexts
    /// `"spindrift v1 mac key"` and `"spindrift v1 enc key"`.
    pub fn derive(key: &SessionKey, session: super::SessionId, epoch: u32) -> Keys {
        let mut material = [0u8; 44];
        material[..32].copy_from_slice(&key.0);
        material[32..40].copy_from_slice(&session.0.to_be_bytes());
        material[40..].copy_from_slice(&epoch.to_be_bytes());
        Keys { mac: blake3::derive_key(MAC_CONTEXT, &material), enc: blake3::derive_key(ENC_CONTEXT, &material) }
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&self.enc.into())
    }

    /// The keyed BLAKE3 hash of `signed` (header and body), truncated to the tag length.
    fn mac(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        let hash = blake3::keyed_hash(&self.mac, signed);
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&hash.as_bytes()[..TAG_LEN]);
        tag
    }
}

/// The AEAD nonce of a datagram: `node u32 BE | packet_number u64 BE`. Unique per key because keys are
/// per (session, epoch), node ids are unique within a session and packet numbers strictly increase.
fn nonce(header: &Header) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&header.node.0.to_be_bytes());
    n[4..].copy_from_slice(&header.packet_number.to_be_bytes());
    n.into()
}

/// Compares two tags in time independent of where they differ.
fn tags_equal(a: &[u8; TAG_LEN], b: &[u8]) -> bool {
    if b.len() != TAG_LEN {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Finishes a datagram in `buf`: the header is written at `buf[..HEADER_LEN]`, then the body of
/// `body_len` bytes; encrypts the body in place when `header.flags` says so and appends the tag.
/// Returns the datagram's length.
///
/// `seal` (re)writes the header from `header` itself, so a caller may leave `buf[..HEADER_LEN]` unset;
/// the body must already be at `buf[HEADER_LEN..HEADER_LEN + body_len]`. Fails with
/// [`EncodeError::TooLarge`] when header, body and tag exceed [`MAX_DATAGRAM`] and with
/// [`EncodeError::BufferTooSmall`] when they exceed `buf`; `buf` is unchanged then.
pub fn seal(header: &Header, body_len: usize, buf: &mut [u8], keys: &Keys) -> Result<usize, EncodeError> {
    let total = HEADER_LEN.saturating_add(body_len).saturating_add(TAG_LEN);
    if total > MAX_DATAGRAM {
        return Err(EncodeError::TooLarge { len: total, max: MAX_DATAGRAM });
    }
    let have = buf.len();
    let datagram = buf.get_mut(..total).ok_or(EncodeError::BufferTooSmall { need: total, have })?;
    let (signed, tag) = datagram.split_at_mut(HEADER_LEN + body_len);
    let (head, body) = signed.split_at_mut(HEADER_LEN);
    write_header(header, head)?;
    if header.flags & FLAG_ENCRYPTED != 0 {
        // Fails only for bodies longer than 256 GiB, far beyond MAX_DATAGRAM.
        let t = keys
            .cipher()
            .encrypt_in_place_detached(&nonce(header), head, body)
            .map_err(|_| EncodeError::TooLarge { len: total, max: MAX_DATAGRAM })?;
        tag.copy_from_slice(&t);
    } else {
        tag.copy_from_slice(&keys.mac(signed));
    }
    Ok(total)
}

/// Authenticates `datagram` (decrypting its body in place if it is encrypted) and returns the header
/// and the plaintext body. Nothing of an unauthenticated datagram is returned.
///
/// The header is checked first, as [`peek_header`] does (length, magic, version, type, flags, reserved);
/// then the tag, in constant time: a mismatch is [`DecodeError::BadTag`], and an encrypted body is left
/// encrypted then. A datagram sealed under another session's or epoch's keys fails with `BadTag` too,
/// since the keys are derived from both.
pub fn open<'a>(datagram: &'a mut [u8], keys: &Keys) -> Result<(Header, &'a [u8]), DecodeError> {
    let header = peek_header(datagram)?;
    // peek_header guarantees HEADER_LEN + TAG_LEN <= len.
    let body_end = datagram.len() - TAG_LEN;
    let (signed, tag) = datagram.split_at_mut(body_end);
    if header.flags & FLAG_ENCRYPTED != 0 {
        let (head, body) = signed.split_at_mut(HEADER_LEN);
        let tag: [u8; TAG_LEN] = (&*tag).try_into().map_err(|_| DecodeError::BadTag)?;
        let tag: Tag = tag.into();
        keys.cipher().decrypt_in_place_detached(&nonce(&header), head, body, &tag).map_err(|_| DecodeError::BadTag)?;
        Ok((header, body))
    } else {
        if !tags_equal(&keys.mac(signed), tag) {
            return Err(DecodeError::BadTag);
        }
        Ok((header, &signed[HEADER_LEN..]))
    }
}
