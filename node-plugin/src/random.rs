//! Random identifiers, from the operating system's generator (`getrandom`).
//! A leaf module.

/// The kernel gave no randomness (`getrandom(2)` failed: a broken host).
#[derive(Debug, thiserror::Error)]
#[error("reading random bytes from the kernel: {0}")]
pub struct NoRandomness(getrandom::Error);

/// `bytes` random bytes as lowercase hex.
pub fn hex(bytes: usize) -> Result<String, NoRandomness> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(NoRandomness)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn hex_has_two_digits_a_byte_and_differs_between_calls() {
        let a = super::hex(16).unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, super::hex(16).unwrap());
    }
}
