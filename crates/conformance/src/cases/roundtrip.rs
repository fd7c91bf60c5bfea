//! Case group 1: Round trips of documents of every shape.

use runstate_core::{Bytes, GetOptions, PutOptions, StoreExt};

use super::noise;
use crate::Ctx;

async fn round_trip(ctx: &Ctx, bytes: Vec<u8>) {
    let (run, doc) = (ctx.run("round-trip"), ctx.doc("doc"));
    let version = ctx
        .store
        .put(
            &run,
            &doc,
            Bytes::from(bytes.clone()),
            PutOptions::overwrite(),
        )
        .await
        .expect("put");
    let got = ctx
        .store
        .get(&run, &doc, GetOptions::new())
        .await
        .expect("get")
        .expect("the document is there");
    assert_eq!(got.bytes.len(), bytes.len(), "length");
    assert!(got.bytes == bytes, "bytes differ after a round trip");
    assert_eq!(got.version, version, "get returns the version put returned");
    let listed = ctx.store.list_all_docs(&run).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, doc);
    assert_eq!(listed[0].size, bytes.len() as u64);
    assert_eq!(listed[0].version, version);
}

/// An empty document is stored and read back as empty (not absent).
pub async fn roundtrip_empty(ctx: Ctx) {
    round_trip(&ctx, Vec::new()).await;
}

/// One byte.
pub async fn roundtrip_one_byte(ctx: Ctx) {
    round_trip(&ctx, vec![0x2a]).await;
}

/// 4 KiB of noise.
pub async fn roundtrip_4kib(ctx: Ctx) {
    round_trip(&ctx, noise(4096, 4)).await;
}

/// 8 MiB of noise.
pub async fn roundtrip_8mib(ctx: Ctx) {
    round_trip(&ctx, noise(8 << 20, 8)).await;
}

/// Every byte value, NULs and invalid UTF-8 included.
pub async fn roundtrip_binary(ctx: Ctx) {
    let mut bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    bytes.extend_from_slice(&[0xff, 0xfe, 0x00, 0xc3, 0x28, 0xed, 0xa0, 0x80]);
    round_trip(&ctx, bytes).await;
}

/// Multi-byte UTF-8 text.
pub async fn roundtrip_utf8(ctx: Ctx) {
    let text = "Ωmega — 水文モデル — 🌧️→🌊 — Ünïcödé\n".repeat(64);
    round_trip(&ctx, text.into_bytes()).await;
}

/// An absent document, in an absent run and in an existing one, is `None`.
pub async fn get_absent_is_none(ctx: Ctx) {
    let run = ctx.run("absent-run");
    let doc = ctx.doc("absent");
    assert!(
        ctx.store
            .get_bytes(&run, &doc)
            .await
            .expect("get")
            .is_none()
    );
    let present = ctx.run("present-run");
    ctx.store
        .put_bytes(&present, &ctx.doc("other"), Bytes::from_static(b"x"))
        .await
        .expect("put");
    assert!(
        ctx.store
            .get_bytes(&present, &doc)
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        ctx.store.list_all_runs().await.expect("list runs") == vec![present],
        "a read creates no run"
    );
}
