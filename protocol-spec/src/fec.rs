//! Forward error correction over blocks of Data packets: systematic Reed-Solomon over GF(2^16)
//! (the `reed-solomon-simd` crate).
//!
//! Source symbol `i` of a block is `body_len u16 | Data body i | zero padding`, all symbols of a block
//! having the same even length (the longest body plus two, rounded up to even). Parity for a block is
//! computed once for `total` symbols; any `k` of the `k + total` symbols rebuild every source body. So
//! one parity packet repairs a *different* lost packet at each receiver.

use thiserror::Error;

/// Why a block could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FecError {
    /// The Reed-Solomon library refused the block.
    #[error("reed-solomon {op} failed for a block of {k} source and {total} parity symbols: {why}")]
    Codec {
        /// "encode" or "decode".
        op: &'static str,
        /// Source symbols.
        k: usize,
        /// Parity symbols.
        total: usize,
        /// The library's message.
        why: String,
    },
    /// A rebuilt symbol's length prefix is larger than the symbol: the inputs were inconsistent.
    #[error("rebuilt source symbol {index} claims {len} bytes but the symbol holds {cap}")]
    BadSymbol {
        /// Which source symbol.
        index: usize,
        /// Its claimed length.
        len: usize,
        /// Room in the symbol.
        cap: usize,
    },
}

/// The symbol length for a block whose longest body is `max_body` bytes.
pub fn symbol_len(max_body: usize) -> usize {
    (max_body + 2 + 1) & !1
}

/// Number of parity symbols a block of `k` sources is coded for.
pub fn parity_total(k: usize) -> usize {
    (2 * k).clamp(2, 1024)
}

fn source_symbol(body: &[u8], len: usize) -> Vec<u8> {
    let mut s = vec![0u8; len];
    // Bodies are at most a datagram (< 64 KiB), so the length always fits the u16 prefix.
    s[..2].copy_from_slice(&(body.len() as u16).to_be_bytes());
    s[2..2 + body.len()].copy_from_slice(body);
    s
}

/// Computes the `parity_total(k)` parity symbols of a block of source `bodies`.
pub fn encode_parity(bodies: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, FecError> {
    let k = bodies.len();
    let total = parity_total(k);
    let len = symbol_len(bodies.iter().map(Vec::len).max().unwrap_or(0));
    let symbols: Vec<Vec<u8>> = bodies.iter().map(|b| source_symbol(b, len)).collect();
    reed_solomon_simd::encode(k, total, &symbols).map_err(|e| FecError::Codec {
        op: "encode",
        k,
        total,
        why: e.to_string(),
    })
}

/// Rebuilds the missing source bodies of a block of `k` sources coded with `total` parity symbols,
/// from the received source bodies (`(index, body)`) and parity symbols (`(index, symbol)`).
/// Needs at least `k` symbols in all. Returns the rebuilt `(index, body)` pairs.
pub fn decode(
    k: usize,
    total: usize,
    sources: &[(usize, &[u8])],
    parity: &[(usize, &[u8])],
) -> Result<Vec<(usize, Vec<u8>)>, FecError> {
    let len = parity.first().map(|(_, s)| s.len()).unwrap_or(0);
    let originals: Vec<(usize, Vec<u8>)> = sources.iter().map(|(i, b)| (*i, source_symbol(b, len))).collect();
    let restored = reed_solomon_simd::decode(k, total, originals.iter().map(|(i, s)| (*i, s)), parity.iter().copied())
        .map_err(|e| FecError::Codec { op: "decode", k, total, why: e.to_string() })?;
    let mut out = Vec::with_capacity(restored.len());
    for (index, symbol) in restored {
        let body_len = usize::from(u16::from_be_bytes([symbol[0], symbol[1]]));
        if body_len + 2 > symbol.len() {
            return Err(FecError::BadSymbol { index, len: body_len, cap: symbol.len() - 2 });
        }
        out.push((index, symbol[2..2 + body_len].to_vec()));
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_k_symbols_rebuild_the_block() {
        let bodies: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 100 + usize::from(i) * 7]).collect();
        let parity = encode_parity(&bodies).expect("encode");
        assert_eq!(parity.len(), parity_total(5));
        // Lose sources 1 and 3; use parity 4 and 7.
        let sources: Vec<(usize, &[u8])> = [0usize, 2, 4].iter().map(|&i| (i, bodies[i].as_slice())).collect();
        let par: Vec<(usize, &[u8])> = [4usize, 7].iter().map(|&i| (i, parity[i].as_slice())).collect();
        let rebuilt = decode(5, parity_total(5), &sources, &par).expect("decode");
        assert_eq!(rebuilt, vec![(1, bodies[1].clone()), (3, bodies[3].clone())]);
    }

    #[test]
    fn too_few_symbols_is_an_error_not_a_panic() {
        let bodies: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 64]).collect();
        let parity = encode_parity(&bodies).expect("encode");
        let sources: Vec<(usize, &[u8])> = vec![(0, bodies[0].as_slice())];
        let par: Vec<(usize, &[u8])> = vec![(0, parity[0].as_slice())];
        assert!(decode(4, parity_total(4), &sources, &par).is_err());
    }
}
