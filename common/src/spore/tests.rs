//! Every way a spore can be bad, each refused with its own message and nothing extracted.

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;
use crate::keys::SecretKey;
use crate::manifest::SporeSpec;

struct Fixture {
    dir: tempfile::TempDir,
    key: SecretKey,
    trust: TrustStore,
}

impl Fixture {
    fn new() -> Self {
        let key = SecretKey::generate();
        let mut trust = TrustStore::new();
        trust.trust(key.public().clone(), "test");
        Fixture {
            dir: tempfile::tempdir().unwrap(),
            key,
            trust,
        }
    }

    fn spec(&self, compression: Compression) -> SporeSpec {
        SporeSpec::from_toml(&format!(
            "name = \"hello\"\nversion = \"1.2.0\"\ncommand = \"./bin/hello\"\ncompression = \"{}\"\nfiles = []\n",
            match compression {
                Compression::None => "none",
                Compression::Zstd => "zstd",
            }
        ))
        .unwrap()
    }

    fn source(&self, name: &str, data: &[u8], mode: u32) -> std::path::PathBuf {
        let p = self.dir.path().join("src").join(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn files(&self) -> Vec<PackFile> {
        let bin: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        vec![
            PackFile {
                path: "bin/hello".into(),
                source: self.source("hello", &bin, 0o755),
                mode: None,
            },
            PackFile {
                path: "share/greeting.txt".into(),
                source: self.source("greeting.txt", b"hello, mesh\n", 0o644),
                mode: None,
            },
        ]
    }

    fn pack_with(&self, spec: &SporeSpec, files: &[PackFile], key: &SecretKey) -> Vec<u8> {
        let mut out = Vec::new();
        pack(spec, files, key, &mut out, &mut |_, _| {}).unwrap();
        out
    }

    fn pack(&self, compression: Compression) -> Vec<u8> {
        self.pack_with(&self.spec(compression), &self.files(), &self.key)
    }

    fn verify(&self, bytes: &[u8]) -> Result<Verified, SporeError> {
        open(Cursor::new(bytes), VerifyOptions::new(&self.trust))?.verify()
    }

    fn extract(&self, bytes: &[u8]) -> (Result<Verified, SporeError>, std::path::PathBuf) {
        let target = self.dir.path().join("run").join("instance-1");
        fs::create_dir_all(target.parent().unwrap()).unwrap();
        let r = open(Cursor::new(bytes), VerifyOptions::new(&self.trust))
            .and_then(|s| extract(s, &target));
        (r, target)
    }

    /// Nothing but the (absent) target may be in the run dir after a refused extraction.
    fn assert_nothing_extracted(&self, target: &Path) {
        assert!(!target.exists(), "target was created");
        let left: Vec<_> = fs::read_dir(target.parent().unwrap())
            .unwrap()
            .flatten()
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// Re-signs a manifest edited as JSON text, so the edit reaches the checks after the signature.
    fn resign(&self, bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let (header, _) = inspect_unverified(Cursor::new(bytes)).unwrap();
        let start = HEADER_LEN;
        let end = start + header.manifest_len as usize;
        let mut value: serde_json::Value = serde_json::from_slice(&bytes[start..end]).unwrap();
        edit(&mut value);
        let manifest = serde_json::to_vec(&value).unwrap();
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&manifest);
        let mut out = bytes[..16].to_vec();
        out[12..16].copy_from_slice(&(manifest.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.key.id().0);
        out.extend_from_slice(&self.key.sign(&signed));
        out.extend_from_slice(&manifest);
        out.extend_from_slice(&bytes[end..]);
        out
    }
}

fn manifest_range(bytes: &[u8]) -> std::ops::Range<usize> {
    let len = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    HEADER_LEN..HEADER_LEN + len
}

fn expect_err(r: Result<Verified, SporeError>, want: &str) -> SporeError {
    match r {
        Ok(_) => panic!("accepted, want error containing {want:?}"),
        Err(e) => {
            assert!(e.to_string().contains(want), "want {want:?} in: {e}");
            e
        }
    }
}

#[test]
fn pack_verify_extract_round_trip_both_encodings() {
    for compression in [Compression::None, Compression::Zstd] {
        let fx = Fixture::new();
        let bytes = fx.pack(compression);
        let v = fx.verify(&bytes).unwrap();
        assert_eq!(v.manifest.name, "hello");
        assert_eq!(v.key_id, fx.key.id());
        assert_eq!(v.content_bytes, 800_000 + 12);
        let (r, target) = fx.extract(&bytes);
        r.unwrap();
        let bin = target.join("bin/hello");
        assert_eq!(
            fs::read(&bin).unwrap(),
            fs::read(fx.dir.path().join("src/hello")).unwrap()
        );
        assert_eq!(
            fs::metadata(&bin).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let txt = target.join("share/greeting.txt");
        assert_eq!(fs::read(&txt).unwrap(), b"hello, mesh\n");
        assert_eq!(
            fs::metadata(&txt).unwrap().permissions().mode() & 0o7777,
            0o644
        );
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        let siblings = fs::read_dir(target.parent().unwrap()).unwrap().count();
        assert_eq!(siblings, 1, "no partial dir left behind");
    }
}

#[test]
fn zstd_makes_compressible_files_smaller() {
    let fx = Fixture::new();
    let raw = fx.pack(Compression::None);
    let z = fx.pack(Compression::Zstd);
    assert!(
        z.len() * 4 < raw.len(),
        "zstd {} vs raw {}",
        z.len(),
        raw.len()
    );
}

#[test]
fn tampered_manifest_byte_is_refused() {
    let fx = Fixture::new();
    let mut bytes = fx.pack(Compression::Zstd);
    let r = manifest_range(&bytes);
    // Flip one byte inside the version string: still valid JSON, but not what was signed.
    let pos = r.start
        + bytes[r.clone()]
            .windows(5)
            .position(|w| w == b"1.2.0")
            .unwrap();
    bytes[pos] = b'9';
    expect_err(fx.verify(&bytes), "does not match the manifest");
    let (r, target) = fx.extract(&bytes);
    expect_err(r, "does not match the manifest");
    fx.assert_nothing_extracted(&target);
}

#[test]
fn tampered_file_byte_is_refused_and_nothing_extracted() {
    for compression in [Compression::None, Compression::Zstd] {
        let fx = Fixture::new();
        let mut bytes = fx.pack(compression);
        let last = bytes.len() - 3;
        bytes[last] ^= 0x01;
        // A flipped byte in a zstd stream either breaks the stream or changes the content.
        let refused = |e: &SporeError| {
            matches!(
                e,
                SporeError::HashMismatch { .. } | SporeError::Decompress(_)
            )
        };
        let e = fx.verify(&bytes).expect_err("tampered spore accepted");
        assert!(refused(&e), "{e}");
        let (r, target) = fx.extract(&bytes);
        let e = r.expect_err("tampered spore extracted");
        assert!(refused(&e), "{e}");
        fx.assert_nothing_extracted(&target);
    }
}

#[test]
fn tampered_file_with_valid_compression_is_refused() {
    // Re-encode the payload with one byte changed: the zstd stream is valid, the hash is not.
    let fx = Fixture::new();
    let raw = fx.pack(Compression::None);
    let end = manifest_range(&raw).end;
    let mut payload = raw[end..].to_vec();
    payload[1000] ^= 0xff;
    let bytes = fx.resign(&raw, |m| m["compression"] = "zstd".into());
    let end = manifest_range(&bytes).end;
    let mut bytes = bytes[..end].to_vec();
    bytes.extend_from_slice(&zstd::encode_all(&payload[..], 3).unwrap());
    let e = expect_err(fx.verify(&bytes), "content hashes to");
    assert!(matches!(e, SporeError::HashMismatch { ref path, .. } if path == "bin/hello"));
}

#[test]
fn unknown_key_is_refused() {
    let fx = Fixture::new();
    let stranger = SecretKey::generate();
    let bytes = fx.pack_with(&fx.spec(Compression::Zstd), &fx.files(), &stranger);
    let e = expect_err(fx.verify(&bytes), "is not in the trusted key list");
    assert!(
        e.to_string()
            .starts_with(&format!("signature by key {}", stranger.id())),
        "{e}"
    );
}

#[test]
fn revoked_key_is_refused() {
    let mut fx = Fixture::new();
    let bytes = fx.pack(Compression::Zstd);
    fx.trust.revoke(fx.key.id(), "laptop stolen");
    expect_err(fx.verify(&bytes), "revoked (laptop stolen)");
}

#[test]
fn signature_by_trusted_key_over_other_bytes_is_refused() {
    // A valid signature lifted from another spore does not cover this manifest.
    let fx = Fixture::new();
    let a = fx.pack(Compression::Zstd);
    let b = fx.pack(Compression::None);
    let mut forged = b.clone();
    forged[16..88].copy_from_slice(&a[16..88]);
    expect_err(fx.verify(&forged), "does not match the manifest");
}

#[test]
fn truncated_files_are_refused_wherever_they_end() {
    let fx = Fixture::new();
    for compression in [Compression::None, Compression::Zstd] {
        let bytes = fx.pack(compression);
        let m = manifest_range(&bytes);
        for (cut, want) in [
            (0, "bad magic"),
            (7, "bad magic"),
            (40, "ends inside the header"),
            (m.start + 10, "ends inside the manifest"),
            (m.end, "truncated"),
            (m.end + 100, "truncated"),
            (bytes.len() - 1, "truncated"),
        ] {
            expect_err(fx.verify(&bytes[..cut]), want);
        }
    }
}

#[test]
fn wrong_magic_version_and_flags_are_refused() {
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    let mut b = good.clone();
    b[1] = b's';
    expect_err(fx.verify(&b), "bad magic");
    let mut b = good.clone();
    b[8] = 2;
    expect_err(fx.verify(&b), "format version 2 is not supported");
    let mut b = good.clone();
    b[10] = 1;
    expect_err(fx.verify(&b), "flags 0x0001");
    expect_err(
        fx.verify(b"PK\x03\x04 this is a zip file, not a spore at all......"),
        "bad magic",
    );
}

#[test]
fn oversized_manifest_is_refused_before_reading_it() {
    let fx = Fixture::new();
    let mut b = fx.pack(Compression::Zstd);
    b[12..16].copy_from_slice(&(MAX_MANIFEST_BYTES + 1).to_le_bytes());
    expect_err(fx.verify(&b), "manifest length 1048577 is outside");
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_err(fx.verify(&b), "manifest length 4294967295");
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    expect_err(fx.verify(&b), "manifest length 0");
}

#[test]
fn path_traversal_entries_are_refused_even_when_signed() {
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    for (path, want) in [
        ("../x", "'..'"),
        ("/etc/x", "absolute"),
        ("share/../../x", "'..'"),
    ] {
        let bytes = fx.resign(&good, |m| m["files"][1]["path"] = path.into());
        let (r, target) = fx.extract(&bytes);
        let e = expect_err(r, want);
        assert!(matches!(e, SporeError::Manifest(_)), "{e}");
        fx.assert_nothing_extracted(&target);
        assert!(!fx.dir.path().join("run/x").exists() && !fx.dir.path().join("x").exists());
    }
}

#[test]
fn symlink_and_device_entries_are_refused() {
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    for (mode, want) in [
        (0o120777, "symbolic link"),
        (0o020666, "character device"),
        (0o060600, "block device"),
    ] {
        let bytes = fx.resign(&good, |m| m["files"][1]["mode"] = mode.into());
        let (r, target) = fx.extract(&bytes);
        expect_err(r, want);
        fx.assert_nothing_extracted(&target);
    }
}

#[test]
fn duplicate_entry_is_refused() {
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    let bytes = fx.resign(&good, |m| m["files"][1]["path"] = "bin/hello".into());
    let (r, target) = fx.extract(&bytes);
    expect_err(r, "appears twice");
    fx.assert_nothing_extracted(&target);
}

#[test]
fn declared_size_smaller_than_content_is_refused() {
    for compression in [Compression::None, Compression::Zstd] {
        let fx = Fixture::new();
        let good = fx.pack(compression);
        // The last file is declared one byte short (with the hash of the shorter content):
        // the extra byte must not be written anywhere and must fail the spore.
        let short = crate::digest::Digest::of(b"hello, mesh");
        let bytes = fx.resign(&good, |m| {
            m["files"][1]["size"] = 11.into();
            m["files"][1]["sha256"] = short.to_string().into();
        });
        let (r, target) = fx.extract(&bytes);
        let e = expect_err(r, "payload continues past the declared files");
        assert!(matches!(e, SporeError::TrailingData));
        fx.assert_nothing_extracted(&target);
    }
}

#[test]
fn declared_size_larger_than_content_is_refused() {
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    let bytes = fx.resign(&good, |m| m["files"][1]["size"] = 13.into());
    expect_err(fx.verify(&bytes), "payload ends after 12 of its 13 bytes");
}

#[test]
fn decompression_bomb_stops_at_the_declared_size() {
    // A small zstd stream that expands far beyond what the manifest declares.
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 19).unwrap();
    assert!(bomb.len() < 64 << 10);
    let end = manifest_range(&good).end;
    let mut bytes = good[..end].to_vec();
    bytes.extend_from_slice(&bomb);
    let (r, target) = fx.extract(&bytes);
    expect_err(r, "content hashes to");
    fx.assert_nothing_extracted(&target);
}

#[test]
fn older_version_than_seen_is_refused_unless_allowed() {
    let fx = Fixture::new();
    let store_path = fx.dir.path().join("versions.json");
    let mut versions = VersionStore::load(&store_path).unwrap();
    let v120 = fx.pack(Compression::Zstd);
    let mut spec = fx.spec(Compression::Zstd);
    spec.version = "1.10.0".parse().unwrap();
    let v1100 = fx.pack_with(&spec, &fx.files(), &fx.key);

    fn opts<'a>(trust: &'a TrustStore, v: &'a mut VersionStore, allow: bool) -> VerifyOptions<'a> {
        VerifyOptions {
            trust,
            versions: Some(v),
            allow_downgrade: allow,
        }
    }
    open(Cursor::new(&v1100), opts(&fx.trust, &mut versions, false))
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(versions.get("hello").unwrap().to_string(), "1.10.0");
    // Semver order, not string order: 1.2.0 < 1.10.0.
    let e = open(Cursor::new(&v120), opts(&fx.trust, &mut versions, false))
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("version 1.2.0 is older than version 1.10.0"),
        "{e}"
    );
    // Persisted: a fresh load refuses too.
    let mut reloaded = VersionStore::load(&store_path).unwrap();
    assert!(open(Cursor::new(&v120), opts(&fx.trust, &mut reloaded, false)).is_err());
    // Explicit downgrade passes and does not lower the mark.
    open(Cursor::new(&v120), opts(&fx.trust, &mut reloaded, true))
        .unwrap()
        .verify()
        .unwrap();
    assert_eq!(reloaded.get("hello").unwrap().to_string(), "1.10.0");
}

#[test]
fn a_failed_verification_does_not_raise_the_version_mark() {
    let fx = Fixture::new();
    let mut versions = VersionStore::load(fx.dir.path().join("v.json")).unwrap();
    let mut bytes = fx.pack(Compression::None);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    let opts = VerifyOptions {
        trust: &fx.trust,
        versions: Some(&mut versions),
        allow_downgrade: false,
    };
    assert!(open(Cursor::new(&bytes), opts).unwrap().verify().is_err());
    assert!(versions.get("hello").is_none());
}

#[test]
fn existing_target_is_never_replaced() {
    let fx = Fixture::new();
    let bytes = fx.pack(Compression::Zstd);
    let (r, target) = fx.extract(&bytes);
    r.unwrap();
    let (r, _) = fx.extract(&bytes);
    expect_err(r, "already exists");
    assert!(target.join("bin/hello").is_file());
}

#[test]
fn packing_refuses_what_verification_would_refuse() {
    let fx = Fixture::new();
    let mut files = fx.files();
    files[1].path = "../escape".into();
    let e = pack(
        &fx.spec(Compression::Zstd),
        &files,
        &fx.key,
        &mut Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("'..'"), "{e}");
    let mut files = fx.files();
    files[0].source = fx.dir.path().to_path_buf();
    let e = pack(
        &fx.spec(Compression::Zstd),
        &files,
        &fx.key,
        &mut Vec::new(),
        &mut |_, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn a_skippable_zstd_frame_cannot_smuggle_unsigned_bytes() {
    // A skippable frame decodes to nothing, so with empty files it would verify while carrying
    // bytes no signature covers. The payload must start with a zstd data frame.
    let fx = Fixture::new();
    let good = fx.pack(Compression::Zstd);
    let end = manifest_range(&good).end;
    let mut skippable = vec![0x5f, 0x2a, 0x4d, 0x18, 11, 0, 0, 0];
    skippable.extend_from_slice(b"hello world");
    for payload in [
        skippable.clone(),
        [skippable, good[end..].to_vec()].concat(),
    ] {
        let mut bytes = good[..end].to_vec();
        bytes.extend_from_slice(&payload);
        expect_err(fx.verify(&bytes), "does not start with a zstd data frame");
    }
}
