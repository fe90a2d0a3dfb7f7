//! SHA-256, the one hash of the project: design ids, task and recipe hashes, weights files and
//! token digests are all SHA-256, written as 64 lowercase hex digits where they are text.
//!
//! Every crate hashes through here, so the hex form (lowercase, two digits a byte, no
//! separator) is decided once.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

/// Returns the SHA-256 of `bytes`.
pub fn sha256(bytes: impl AsRef<[u8]>) -> [u8; 32] {
    Sha256::digest(bytes.as_ref()).into()
}

/// Returns the SHA-256 of `bytes` in lowercase hex (64 digits).
pub fn sha256_hex(bytes: impl AsRef<[u8]>) -> String {
    hex(&sha256(bytes))
}

/// Returns `bytes` in lowercase hex, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 * bytes.len());
    for byte in bytes {
        write!(text, "{byte:02x}").expect("writing to a String cannot fail");
    }
    text
}

/// A SHA-256 fed piece by piece, for data that arrives in chunks or is too large to hold;
/// [`Sha256Hex::finish`] gives what [`sha256_hex`] would of all the pieces together.
///
/// It is also an [`std::io::Write`] sink (writes never fail), so `std::io::copy` can hash a
/// reader.
#[derive(Clone, Debug, Default)]
pub struct Sha256Hex(Sha256);

impl Sha256Hex {
    /// Starts an empty hash.
    pub fn new() -> Sha256Hex {
        Sha256Hex::default()
    }

    /// Appends `bytes` to the hashed data.
    pub fn update(&mut self, bytes: impl AsRef<[u8]>) {
        self.0.update(bytes.as_ref());
    }

    /// Returns the SHA-256 of everything appended, in lowercase hex (64 digits).
    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

impl std::io::Write for Sha256Hex {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 180-2, appendix B.1 and B.2, and the hash of no data.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const TWO_BLOCKS: &str = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const TWO_BLOCKS_TEXT: &str = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";

    #[test]
    fn known_vectors() {
        assert_eq!(sha256_hex("abc"), ABC);
        assert_eq!(sha256_hex(b"abc"), ABC);
        assert_eq!(sha256_hex(TWO_BLOCKS_TEXT.as_bytes()), TWO_BLOCKS);
        assert_eq!(sha256_hex(b""), EMPTY);
        assert_eq!(hex(&sha256("abc")), ABC);
        assert_eq!(sha256("abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
    }

    #[test]
    fn pieces_hash_as_the_whole() {
        for split in 0..=TWO_BLOCKS_TEXT.len() {
            let (head, tail) = TWO_BLOCKS_TEXT.split_at(split);
            let mut hasher = Sha256Hex::new();
            hasher.update(head);
            hasher.update(tail.as_bytes());
            assert_eq!(hasher.finish(), TWO_BLOCKS, "split at {split}");
        }
        assert_eq!(Sha256Hex::new().finish(), EMPTY);
    }

    #[test]
    fn a_reader_copies_into_it() {
        let mut hasher = Sha256Hex::new();
        let copied = std::io::copy(&mut TWO_BLOCKS_TEXT.as_bytes(), &mut hasher).unwrap();
        assert_eq!(copied, TWO_BLOCKS_TEXT.len() as u64);
        assert_eq!(hasher.finish(), TWO_BLOCKS);
    }
}
