//! Content digests: `sha256:<64 lowercase hex>`, nothing else accepted.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 content digest. Its text form is `sha256:<64 lowercase hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} must start with \"sha256:\"")]
    Algorithm(String),
    #[error("digest {0:?} must have exactly 64 hex digits after \"sha256:\"")]
    Length(String),
    #[error("digest {0:?} must use lowercase hex digits 0-9a-f only")]
    Hex(String),
}

impl Digest {
    pub const PREFIX: &'static str = "sha256:";

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Digest(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    /// Digest of everything a reader yields, and how many bytes that was.
    pub fn of_reader(mut reader: impl Read) -> io::Result<(Self, u64)> {
        let mut hashing = HashingReader::new(&mut reader);
        io::copy(&mut hashing, &mut io::sink())?;
        let (digest, len) = hashing.finish();
        Ok((digest, len))
    }

    /// The 64 hex digits without the algorithm prefix (the file name in a blob store).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, for humans; never for lookups.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// Parses the bare 64-digit hex form (a blob file name).
    pub fn from_hex(hex_digits: &str) -> Result<Self, DigestError> {
        if hex_digits.len() != 64 {
            return Err(DigestError::Length(hex_digits.to_string()));
        }
        if !hex_digits
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(DigestError::Hex(hex_digits.to_string()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_digits, &mut out)
            .map_err(|_| DigestError::Hex(hex_digits.to_string()))?;
        Ok(Digest(out))
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some(rest) = s.strip_prefix(Self::PREFIX) else {
            return Err(DigestError::Algorithm(s.to_string()));
        };
        Digest::from_hex(rest).map_err(|e| match e {
            DigestError::Length(_) => DigestError::Length(s.to_string()),
            _ => DigestError::Hex(s.to_string()),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", Self::PREFIX, self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A reader that hashes and counts every byte that passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> (Digest, u64) {
        (Digest(self.hasher.finalize().into()), self.len)
    }

    pub fn into_parts(self) -> (R, Digest, u64) {
        (self.inner, Digest(self.hasher.finalize().into()), self.len)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// A writer that hashes and counts every byte written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Digest and length of everything written.
    pub fn finish(self) -> (Digest, u64) {
        (Digest(self.hasher.finalize().into()), self.len)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_input_has_the_well_known_digest() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        assert_eq!(Digest::of_reader(&b""[..]).unwrap(), (Digest::of(b""), 0));
    }

    #[test]
    fn text_form_round_trips() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.short(), "e3b0c44298fc");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn strict_parsing_refuses_near_misses() {
        let upper = EMPTY.replace('e', "E");
        let cases: Vec<(String, DigestError)> = vec![
            (
                EMPTY[7..].to_string(),
                DigestError::Algorithm(EMPTY[7..].to_string()),
            ),
            (
                EMPTY.replace("sha256", "SHA256"),
                DigestError::Algorithm(EMPTY.replace("sha256", "SHA256")),
            ),
            (
                EMPTY.replace("sha256", "sha512"),
                DigestError::Algorithm(EMPTY.replace("sha256", "sha512")),
            ),
            (
                EMPTY[..EMPTY.len() - 1].to_string(),
                DigestError::Length(EMPTY[..EMPTY.len() - 1].to_string()),
            ),
            (
                format!("{EMPTY}0"),
                DigestError::Length(format!("{EMPTY}0")),
            ),
            (upper.clone(), DigestError::Hex(upper)),
            (
                EMPTY.replace('e', "g"),
                DigestError::Hex(EMPTY.replace('e', "g")),
            ),
            (
                format!(" {EMPTY}"),
                DigestError::Algorithm(format!(" {EMPTY}")),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Digest>(), Err(want), "{input:?}");
        }
        // Multi-byte characters must not confuse the length check.
        let sneaky = format!("sha256:{}é", &EMPTY[7..69]);
        assert!(sneaky.parse::<Digest>().is_err());
    }

    #[test]
    fn hashing_reader_counts_and_hashes() {
        let data = vec![7u8; 100_000];
        let mut r = HashingReader::new(&data[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(r.len(), 100_000);
        assert_eq!(r.finish().0, Digest::of(&data));
    }
}
