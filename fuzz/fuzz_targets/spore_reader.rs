//! Fuzzes the spore reader two ways: raw bytes as a spore file (the header, trust and
//! signature checks), and bytes signed as a manifest by a trusted key followed by a payload
//! (what lies behind the signature: JSON parsing, validation, streaming, decompression).
//! Run: `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run spore_reader`.
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use mesh_common::keys::SecretKey;
use mesh_common::spore::{self, SIGNING_CONTEXT, VerifyOptions};
use mesh_common::trust::TrustStore;

fuzz_target!(|data: &[u8]| {
    let key = SecretKey::from_seed(&[7u8; 32]);
    let mut trust = TrustStore::new();
    trust.trust(key.public().clone(), "fuzz");

    let _ = spore::inspect_unverified(Cursor::new(data));
    if let Ok(s) = spore::open(Cursor::new(data), VerifyOptions::new(&trust)) {
        let _ = s.verify();
    }

    // Signed mode: the first two bytes say how much of the rest is the manifest.
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (manifest, payload) = data[2..].split_at(split);
    if manifest.is_empty() {
        return;
    }
    let mut signed = SIGNING_CONTEXT.to_vec();
    signed.extend_from_slice(manifest);
    let mut file = spore::MAGIC.to_vec();
    file.extend_from_slice(&spore::FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&0u16.to_le_bytes());
    file.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    file.extend_from_slice(&key.id().0);
    file.extend_from_slice(&key.sign(&signed));
    file.extend_from_slice(manifest);
    file.extend_from_slice(payload);
    if let Ok(s) = spore::open(Cursor::new(&file), VerifyOptions::new(&trust)) {
        let _ = s.verify();
    }
});
