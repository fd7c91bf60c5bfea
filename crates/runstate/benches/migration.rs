//! Migration throughput and memory: 1,000 documents of 16 KiB moved by the
//! real `runstate migrate` binary between every ordered pair of backends,
//! each against the slower side's raw write rate measured just before it.
//!
//! Run it with `cargo xtask bench`, which builds the binary in release mode
//! and names it in `RUNSTATE_BIN`. For each pair it prints:
//!
//! - documents/s and MB/s of the migration (its own clock: copy, read-back
//!   and SHA-256 verification of every document, without process start-up),
//!   of its median round (below);
//! - the raw write rate of 16 KiB values on each side (one writer, the raw
//!   client of `support::raw`), and the ratio to the slower one (target
//!   ≥ 1.0, and ≥ 0.8 into S3, whose writes cannot be batched into fewer
//!   requests), plus, for information, the ratio to 8 concurrent raw
//!   writers. The slower side's single-writer rate is measured again right
//!   after the migration, and the ratio is to the mean of the two: a disk's
//!   `fsync` latency drifts by 2× within a run here, and a baseline taken
//!   only before would credit or blame the migration for that drift. The
//!   migration runs three times (once with `--quick`), each run between
//!   two such baselines (the one after a run is the one before the next),
//!   and the pair's ratio is the median of the three; every round's ratio
//!   is shown and kept in the report. One round alone met all four targets
//!   into file in one run here and missed three of them 90 minutes later,
//!   on the same code: a single sample cannot tell the migration from the
//!   disk;
//! - how the copies were verified: read back, or by the target's MD5 (S3
//!   ETags);
//! - the peak resident memory of the migrating process (`VmHWM`), the
//!   highest of the rounds.
//!
//! A migration reads every document of the source once and, on S3, lists
//! the run twice (the plan, and the final check that nothing changed
//! meanwhile). A second table, one row per pair out of S3, shows that
//! floor: one raw client doing only the requests a verified copy out of
//! S3 needs (a listing of the values, one `GET` each, a listing again),
//! beside the raw single-writer and single-reader rates, all measured on
//! the same values just before the first round. The floor's ratio to the
//! slower side's raw write rate is what a migration out of S3 reaches one
//! request at a time; its concurrent `GET`s can win back only the round
//! trips a single client waits through, which on a server that does its
//! work on one core (moto) is little. The same table shows the copy floor:
//! raw clients of both sides copying the values with eight copies in
//! flight (each a `GET` and a raw write to the target), between a listing
//! before and one after, which is the least a copy out of S3 costs when
//! both servers share the machine, without verifying anything. Into S3
//! a table shows the same copy floor, without the listings: a raw read
//! from the source and a plain `PUT` per value, eight in flight. Each floor
//! is measured once per pair and set against the median round.
//!
//! Into the file backend, a third row shows the layout's floor with lock
//! records: one writer making each value durable as the raw writer does,
//! and creating beside it the small lock record the file store keeps for a
//! document that has one (its `flock` target, which makes check-and-write
//! atomic across processes): two new inodes per document where the raw
//! writer makes one. Batches (which migrations use) create no record for a
//! document that has none (they hold the run's records lock instead), so a
//! migration into a new run makes one inode per document, as the raw writer
//! does; the row shows what a record per document would cost. It is
//! measured after the last round, so that its own cleanup cannot slow a
//! migration down.
//!
//! With S3 as the slower side, a last table shows where the S3 server's
//! one core went (moto's CPU time from `/proc/<pid>/stat`, the PID named
//! by `cargo xtask bench` in `RUNSTATE_S3_SERVER_PID`; left out, with a
//! line saying so, without it): its CPU per raw `PUT` (in the two
//! baselines of the median round, the writes its ratio is to), per raw
//! `GET`, per copy of the copy floor and per migrated document, and its
//! share of one core in the baselines, the copy floor and the migration,
//! beside the machine's busy cores and the migrating process's CPU per
//! document in the median round. Against a server that does its work on
//! one core, a rate is that share over that cost, so the ratio splits
//! into a cost factor (how much of the server a migrated document takes
//! against a raw write) and a share factor (how much of its core the
//! server got during the migration against the raw writer's runs). Out of
//! S3 it also shows the server's CPU per document of the read floor (the
//! requests any copy out of S3 sends) and the ceiling that sets: the
//! ratio a copy would reach with the server spending its whole core on
//! those requests, whatever the client does.

mod support;

use std::process::Command;
use std::time::Instant;

use runstate::{Bytes, DocName, RunId};
use serde::Serialize;
use support::Args;
use support::cpu::{self, Spent};
use support::places::{ALL, Backend, Place, Places};
use support::raw::Raw;

const DOC_SIZE: usize = 16 * 1024;
/// The target ratio to the slower side's raw single-writer rate.
const TARGET: f64 = 1.0;
/// The target into S3: every document is a request of its own there.
const TARGET_INTO_S3: f64 = 0.8;
const RUN: &str = "migbench";
/// Migrations per pair, each between two raw baselines (one with `--quick`).
const ROUNDS: usize = 3;

#[derive(Debug, Serialize)]
struct Row {
    from: &'static str,
    to: &'static str,
    documents: u64,
    docs_per_sec: f64,
    mb_per_sec: f64,
    raw_from_docs_per_sec: f64,
    raw_to_docs_per_sec: f64,
    /// The slower side's single-writer rate again, right after the median
    /// round's migration.
    raw_slower_after_docs_per_sec: f64,
    /// The mean of the slower side's rate before and after the median
    /// round: the baseline of `ratio`.
    baseline_docs_per_sec: f64,
    /// Every round, in order.
    rounds: Vec<Round>,
    /// One raw reader on the source side, reading what its raw writer wrote.
    raw_from_read_docs_per_sec: f64,
    /// Out of S3: the read floor (see the module documentation).
    floor_docs_per_sec: Option<f64>,
    /// The floor's ratio to the slower side's raw single-writer rate
    /// measured just before it (the first round's baseline before).
    floor_ratio: Option<f64>,
    /// With S3 on one side: the copy floor (see the module documentation).
    copy_floor_docs_per_sec: Option<f64>,
    /// The copy floor's ratio to the slower side's raw single-writer rate
    /// measured just before it (the first round's baseline before).
    copy_floor_ratio: Option<f64>,
    /// Into file, where file is the slower side: the layout floor (see the
    /// module documentation).
    record_floor_docs_per_sec: Option<f64>,
    /// The layout floor's ratio to the slower side's raw single-writer rate
    /// measured just before it (the last round's baseline after).
    record_floor_ratio: Option<f64>,
    slower_side: &'static str,
    /// The median of the rounds' ratios.
    ratio: f64,
    raw8_slower_docs_per_sec: f64,
    ratio_vs_8_writers: f64,
    verified_by_md5: u64,
    /// The highest of the rounds.
    peak_rss_mib: f64,
    target: f64,
    meets_target: bool,
    /// With S3 as the slower side and its server's PID known: where the
    /// S3 server's core went (see [`ServerCpu`]).
    s3_server: Option<ServerCpu>,
}

/// With S3 as the slower side: the S3 server's CPU (moto's, from `/proc`)
/// per request or document, in the raw baselines, the raw reader, the
/// read and copy floors and the median round, and its share of one core
/// in the baselines, the copy floor and the median round, beside the
/// machine's busy cores and the migrating process's CPU in that round.
/// Moto works on one core, so a rate against it is its share of a core
/// over its CPU per document; the migration's ratio is about
/// `cost_factor` × `share_factor` (not exactly: the migration's rate is
/// timed by its own clock, without the process's start-up, and its share
/// over the whole process).
#[derive(Debug, Clone, Copy, Serialize)]
struct ServerCpu {
    /// Per `PUT` of the S3 side's raw single writer: the mean of the median
    /// round's two baselines (the writes its ratio is to), as is the share.
    raw_put_ms: f64,
    raw_put_share: f64,
    /// Per `GET` of the S3 side's raw single reader.
    raw_get_ms: Option<f64>,
    /// Out of S3: per document of the read floor, the requests any copy
    /// out of S3 must send (a `GET` each, two listings of the run).
    read_floor_ms: Option<f64>,
    /// Out of S3: `raw_put_ms` / `read_floor_ms` over `raw_put_share`, the
    /// ratio a copy would reach if the server spent all of its core on
    /// those requests and nothing else: the ceiling of any migration out of
    /// S3 against this server, whatever its client does.
    ceiling: Option<f64>,
    /// Per document of the copy floor (a `GET` or a `PUT` each, plus the
    /// listings out of S3).
    copy_floor_ms: Option<f64>,
    copy_floor_share: Option<f64>,
    /// Per document of the median round, everything the migration sent
    /// (the store's probe on opening, leases, listings, milestones)
    /// included; the share is over the process's whole run.
    migration_ms: f64,
    migration_share: f64,
    /// The machine's busy cores during the median round (of the
    /// report's `cores`).
    machine_cores: Option<f64>,
    /// The migrating process's CPU per document in the median round,
    /// start-up included.
    migrator_ms: Option<f64>,
    /// `raw_put_ms` / `migration_ms`: how much less of the server a
    /// migrated document costs than a raw write.
    cost_factor: f64,
    /// `migration_share` / `raw_put_share`: how much of the server's core
    /// the migration got, against the raw writer.
    share_factor: f64,
}

impl ServerCpu {
    /// Built when the server's CPU was read in every phase it needs; the
    /// read floor and the ceiling only out of S3. S3 must be the slower
    /// side: the median round's baselines are its raw writes.
    fn new(
        out_of_s3: bool,
        s3_side: &RawRates,
        copy_floor: Option<&Spent>,
        median: &Round,
        documents: u64,
        raw_writes: u64,
    ) -> Option<ServerCpu> {
        let (a, b) = (&median.raw_before_cpu, &median.raw_after_cpu);
        let raw_put_ms = (a.server_ms_per(raw_writes)? + b.server_ms_per(raw_writes)?) / 2.0;
        let raw_put_share = (a.server_share()? + b.server_share()?) / 2.0;
        let migration_ms = median.cpu.server_ms_per(documents)?;
        let migration_share = median.cpu.server_share()?;
        let read_floor_ms = s3_side
            .floor_cpu
            .filter(|_| out_of_s3)
            .and_then(|f| f.server_ms_per(raw_writes));
        Some(ServerCpu {
            raw_put_ms,
            raw_put_share,
            raw_get_ms: s3_side.read_cpu.server_ms_per(raw_writes),
            read_floor_ms,
            ceiling: read_floor_ms.map(|floor| raw_put_ms / floor / raw_put_share),
            copy_floor_ms: copy_floor.and_then(|c| c.server_ms_per(raw_writes)),
            copy_floor_share: copy_floor.and_then(Spent::server_share),
            migration_ms,
            migration_share,
            machine_cores: median.cpu.machine_cores(),
            migrator_ms: median.cpu.children_ms_per(documents),
            cost_factor: raw_put_ms / migration_ms,
            share_factor: migration_share / raw_put_share,
        })
    }
}

/// One migration of a pair between two raw baselines of its slower side:
/// its rates and report, the baselines and its ratio to their mean.
#[derive(Debug, Clone, Copy, Serialize)]
struct Round {
    docs_per_sec: f64,
    mb_per_sec: f64,
    raw_before_docs_per_sec: f64,
    raw_after_docs_per_sec: f64,
    /// `docs_per_sec` over the mean of the two baselines.
    ratio: f64,
    peak_rss_mib: f64,
    verified_by_md5: u64,
    /// CPU spent while the migrating process ran (see `support::cpu`).
    cpu: Spent,
    /// CPU spent by the two baselines' raw writes.
    raw_before_cpu: Spent,
    raw_after_cpu: Spent,
}

/// The round whose ratio is the median (the lower middle one of an even
/// number); `None` without rounds.
fn median_round(rounds: &[Round]) -> Option<Round> {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| a.ratio.total_cmp(&b.ratio));
    sorted.get(sorted.len().saturating_sub(1) / 2).copied()
}

/// The rounds' ratios in order, for the table: `0.95× / 1.02× / 1.10×`.
fn round_ratios(rounds: &[Round]) -> String {
    rounds
        .iter()
        .map(|r| format!("{:.2}×", r.ratio))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// A 16 KiB document, different for every index.
fn document(i: u64) -> Bytes {
    let mut rng = fastrand::Rng::with_seed(i);
    Bytes::from((0..DOC_SIZE).map(|_| rng.u8(..)).collect::<Vec<u8>>())
}

/// The raw rates of one side, in documents of 16 KiB per second.
struct RawRates {
    /// One writer.
    write_one: f64,
    /// Eight concurrent writers.
    write_eight: f64,
    /// One reader, reading back what the single writer wrote.
    read_one: f64,
    /// S3 only: a listing, one read of each value, a listing again (the
    /// least a verified migration out of S3 sends), by one client.
    floor: Option<f64>,
    /// CPU spent by the single writer's writes, the single reader's
    /// reads and (S3 only) the read floor.
    write_cpu: Spent,
    read_cpu: Spent,
    floor_cpu: Option<Spent>,
}

/// Writes `values` by one writer, under keys `k0`, `k1`, … (the values
/// are made before the clock starts); the time and CPU they took.
async fn timed_writes(raw: &Raw, values: &[Bytes]) -> Spent {
    let before = cpu::sample();
    for (i, value) in values.iter().enumerate() {
        raw.write(&format!("k{i}"), value.clone()).await;
    }
    before.spent()
}

/// Raw writes of 16 KiB per second by one writer, and the CPU they took.
async fn write_rate(backend: &str, writes: u64, tag: &str) -> (f64, Spent) {
    let raw = Raw::open(backend, tag).await;
    let values: Vec<Bytes> = (0..writes).map(document).collect();
    let spent = timed_writes(&raw, &values).await;
    raw.cleanup().await;
    (spent.per_sec(writes), spent)
}

/// Raw writes of 16 KiB per second (one writer, then eight), reads by one
/// reader and, on S3, the read floor.
async fn raw_rates(backend: &str, writes: u64, tag: &str) -> RawRates {
    let raw = Raw::open(backend, tag).await;
    let values: Vec<Bytes> = (0..writes).map(document).collect();
    let write_cpu = timed_writes(&raw, &values).await;
    let before = cpu::sample();
    for i in 0..writes {
        assert_eq!(raw.read(&format!("k{i}")).await.len(), DOC_SIZE);
    }
    let read_cpu = before.spent();
    // Measured before the eight writers add their values to the prefix.
    let before = cpu::sample();
    let floor_cpu = match raw.list().await {
        Some(listed) => {
            assert_eq!(listed as u64, writes, "the listing holds every value");
            for i in 0..writes {
                assert_eq!(raw.read(&format!("k{i}")).await.len(), DOC_SIZE);
            }
            raw.list().await;
            Some(before.spent())
        }
        None => None,
    };
    let before = cpu::sample();
    let raw_ref = &raw;
    let values_ref = &values;
    let writers = (0..8u64).map(|w| async move {
        for i in (w..writes).step_by(8) {
            raw_ref
                .write(&format!("c{i}"), values_ref[i as usize].clone())
                .await;
        }
    });
    futures_util::future::join_all(writers).await;
    let write_eight = before.spent().per_sec(writes);
    raw.cleanup().await;
    RawRates {
        write_one: write_cpu.per_sec(writes),
        write_eight,
        read_one: read_cpu.per_sec(writes),
        floor: floor_cpu.map(|f| f.per_sec(writes)),
        write_cpu,
        read_cpu,
        floor_cpu,
    }
}

/// With S3 on one side (`None` otherwise): copies per second of `writes`
/// values by raw clients of both sides, eight in flight, each a raw read
/// from `from` and a raw write to `to` (the values are written to `from`
/// before the clock starts). Out of S3 the values are listed before and
/// after, as a migration lists its source there; into S3 nothing else is
/// sent, the least a copy into S3 costs. Returns the rate and the CPU
/// spent while copying.
async fn copy_floor(from: &str, to: &str, writes: u64, tag: &str) -> Option<(f64, Spent)> {
    if from != "s3" && to != "s3" {
        return None;
    }
    let source = Raw::open(from, &format!("{tag}cf")).await;
    let target = Raw::open(to, &format!("{tag}ct")).await;
    for i in 0..writes {
        source.write(&format!("k{i}"), document(i)).await;
    }
    let before = cpu::sample();
    if let Some(listed) = source.list().await {
        assert_eq!(listed as u64, writes, "every value listed");
    }
    let (source_ref, target_ref) = (&source, &target);
    let copiers = (0..8u64).map(|w| async move {
        for i in (w..writes).step_by(8) {
            let key = format!("k{i}");
            let bytes = source_ref.read(&key).await;
            target_ref.write(&key, bytes).await;
        }
    });
    futures_util::future::join_all(copiers).await;
    source.list().await;
    let spent = before.spent();
    source.cleanup().await;
    target.cleanup().await;
    Some((spent.per_sec(writes), spent))
}

/// Into file (`None` otherwise): new values made durable per second by
/// one writer, as the raw writer does, each with a lock record of 128
/// bytes created beside it in a bookkeeping folder (not synced, as the
/// file store's records are not).
async fn record_floor(to: &str, writes: u64, tag: &str) -> Option<f64> {
    if to != "file" {
        return None;
    }
    let dir = std::env::temp_dir().join(format!("runstate-raw-{tag}rf"));
    let book = dir.join(".runstate");
    std::fs::create_dir_all(&book).expect("the floor's folders");
    let started = Instant::now();
    for i in 0..writes {
        let (dir, book, value) = (dir.clone(), book.clone(), document(i));
        tokio::task::spawn_blocking(move || {
            std::fs::write(book.join(format!("doc.k{i}.lease")), [b' '; 128]).expect("record");
            support::raw::durable_write(&dir, &format!("k{i}"), &value);
        })
        .await
        .expect("join");
    }
    let rate = writes as f64 / started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Some(rate)
}

async fn seed(place: &Place, documents: u64) {
    let store = runstate::open(&place.url).await.expect("open the source");
    let run = RunId::new(RUN).expect("valid");
    for i in 0..documents {
        let name = DocName::new(format!("doc{i:05}")).expect("valid");
        store
            .put(&run, &name, document(i), runstate::PutOptions::overwrite())
            .await
            .expect("seed");
    }
}

/// Runs the binary; returns its JSON report.
fn migrate(bin: &str, from: &Place, to: &Place) -> serde_json::Value {
    let output = Command::new(bin)
        .args([
            "migrate", "--from", &from.url, "--to", &to.url, "--run", RUN, "--json",
        ])
        .output()
        .expect("run the runstate binary");
    assert!(
        output.status.success(),
        "migration failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("a JSON report")
}

fn main() {
    let args = Args::parse("migration.json");
    let Ok(bin) = std::env::var("RUNSTATE_BIN") else {
        eprintln!(
            "migration benchmark: RUNSTATE_BIN is not set; run `cargo xtask bench`, which builds \
             the runstate binary in release mode and sets it"
        );
        return;
    };
    let (documents, raw_writes, rounds_per_pair) = if args.quick {
        (200u64, 64u64, 1)
    } else {
        (1000, 500, ROUNDS)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    let mut pair_index = 0u32;
    runtime.block_on(async {
        for from in ALL {
            let Some(source) = from.place("migration bench") else {
                continue;
            };
            let targets: Vec<Backend> = ALL
                .into_iter()
                .filter(|to| *to != from && (args.wants(from.name()) || args.wants(to.name())))
                .collect();
            seed(&source, documents).await;
            for to in targets {
                let Some(target) = to.place("migration bench") else {
                    continue;
                };
                pair_index += 1;
                let tag = format!("m{}x{pair_index}", std::process::id());
                let from_raw = raw_rates(from.name(), raw_writes, &tag).await;
                let to_raw = raw_rates(to.name(), raw_writes, &tag).await;
                let copy = copy_floor(from.name(), to.name(), raw_writes, &tag).await;
                let copied_raw = copy.map(|(rate, _)| rate);
                let (from_one, from_eight) = (from_raw.write_one, from_raw.write_eight);
                let (to_one, to_eight) = (to_raw.write_one, to_raw.write_eight);
                let (slower_side, slower, slower_eight, slower_cpu) = if from_one <= to_one {
                    (from.name(), from_one, from_eight, from_raw.write_cpu)
                } else {
                    (to.name(), to_one, to_eight, to_raw.write_cpu)
                };
                let mut rounds = Vec::with_capacity(rounds_per_pair);
                let (mut before, mut before_cpu) = (slower, slower_cpu);
                for round in 0..rounds_per_pair {
                    let started = cpu::sample();
                    let report = migrate(&bin, &source, &target);
                    let cpu = started.spent();
                    target.cleanup().await;
                    let copied = report["documents"].as_u64().unwrap_or(0);
                    assert_eq!(copied, documents, "every document copied: {report:#}");
                    let docs_per_sec = report["documents_per_sec"].as_f64().unwrap_or(0.0);
                    let (after, after_cpu) =
                        write_rate(slower_side, raw_writes, &format!("{tag}a{round}")).await;
                    rounds.push(Round {
                        docs_per_sec,
                        mb_per_sec: report["mb_per_sec"].as_f64().unwrap_or(0.0),
                        raw_before_docs_per_sec: before,
                        raw_after_docs_per_sec: after,
                        ratio: docs_per_sec / ((before + after) / 2.0),
                        peak_rss_mib: report["peak_rss_bytes"].as_f64().unwrap_or(0.0)
                            / (1024.0 * 1024.0),
                        verified_by_md5: report["verified_by_md5"].as_u64().unwrap_or(0),
                        cpu,
                        raw_before_cpu: before_cpu,
                        raw_after_cpu: after_cpu,
                    });
                    (before, before_cpu) = (after, after_cpu);
                }
                let median = median_round(&rounds).expect("at least one round");
                // Shown only where file is the slower side: the floor is a
                // file writer's, a ratio to another side's rate means nothing.
                let records = if slower_side == "file" {
                    record_floor(to.name(), raw_writes, &tag).await
                } else {
                    None
                };
                let baseline =
                    (median.raw_before_docs_per_sec + median.raw_after_docs_per_sec) / 2.0;
                let (ratio, docs_per_sec) = (median.ratio, median.docs_per_sec);
                // Only where S3 is the slower side: the ratio is to its
                // raw writes then (the median round's two baselines), which
                // the server's CPU can explain; against another side's
                // writes it cannot.
                let s3_server = (slower_side == Backend::S3.name())
                    .then_some(if from == Backend::S3 {
                        &from_raw
                    } else {
                        &to_raw
                    })
                    .and_then(|side| {
                        ServerCpu::new(
                            from == Backend::S3,
                            side,
                            copy.as_ref().map(|(_, spent)| spent),
                            &median,
                            documents,
                            raw_writes,
                        )
                    });
                let target_ratio = if to == Backend::S3 {
                    TARGET_INTO_S3
                } else {
                    TARGET
                };
                let row = Row {
                    from: from.name(),
                    to: to.name(),
                    documents,
                    docs_per_sec,
                    mb_per_sec: median.mb_per_sec,
                    raw_from_docs_per_sec: from_one,
                    raw_to_docs_per_sec: to_one,
                    raw_slower_after_docs_per_sec: median.raw_after_docs_per_sec,
                    baseline_docs_per_sec: baseline,
                    raw_from_read_docs_per_sec: from_raw.read_one,
                    floor_docs_per_sec: from_raw.floor,
                    floor_ratio: from_raw.floor.map(|floor| floor / slower),
                    copy_floor_docs_per_sec: copied_raw,
                    copy_floor_ratio: copied_raw.map(|floor| floor / slower),
                    record_floor_docs_per_sec: records,
                    record_floor_ratio: records.map(|floor| floor / before),
                    slower_side,
                    ratio,
                    raw8_slower_docs_per_sec: slower_eight,
                    ratio_vs_8_writers: docs_per_sec / slower_eight,
                    verified_by_md5: median.verified_by_md5,
                    peak_rss_mib: rounds.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max),
                    rounds,
                    target: target_ratio,
                    meets_target: ratio >= target_ratio,
                    s3_server,
                };
                eprintln!(
                    "{} → {}: {:.0} documents/s, {:.2}× the slower side's raw writes \
                     (median of rounds {})",
                    row.from,
                    row.to,
                    row.docs_per_sec,
                    row.ratio,
                    round_ratios(&row.rounds)
                );
                rows.push(row);
            }
            source.cleanup().await;
        }
    });
    print_table(&rows);
    print_server_table(&rows);
    let report = serde_json::json!({
        "quick": args.quick,
        "doc_size": DOC_SIZE,
        "documents": documents,
        "target": TARGET,
        "target_into_s3": TARGET_INTO_S3,
        "rounds_per_pair": rounds_per_pair,
        "cores": cpu::cores(),
        "rows": rows,
    });
    args.write_report(&report);
}

fn print_table(rows: &[Row]) {
    println!(
        "| from → to | docs | docs/s | MB/s | raw write docs/s (from / to) | slower side after | \
         ratio to slower (median) | rounds | target | vs 8 raw writers | verified | \
         peak RSS MiB | |"
    );
    println!("|---|---:|---:|---:|---|---:|---:|---|---:|---:|---|---:|---|");
    for r in rows {
        println!(
            "| {} → {} | {} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} | {:.2}× | {} | ≥ {:.1}× | {:.2}× | {} | {:.1} | {} |",
            r.from,
            r.to,
            r.documents,
            r.docs_per_sec,
            r.mb_per_sec,
            r.raw_from_docs_per_sec,
            r.raw_to_docs_per_sec,
            r.raw_slower_after_docs_per_sec,
            r.ratio,
            round_ratios(&r.rounds),
            r.target,
            r.ratio_vs_8_writers,
            if r.verified_by_md5 == r.documents {
                "by MD5"
            } else {
                "read back"
            },
            r.peak_rss_mib,
            if r.meets_target { "ok" } else { "MISSED" },
        );
    }
    print_floor_table(
        rows,
        "Layout floor into file (one writer: each value made durable as the raw writer does, \
         and its lock record created beside it; measured after the last round)",
        "layout floor",
        |r| r.record_floor_docs_per_sec.zip(r.record_floor_ratio),
    );
    print_floor_table(
        rows,
        "Copy floor into S3: raw clients of both sides, eight copies in flight, each a raw read \
         and a plain PUT, nothing listed or checked; just before the first round.",
        "copy floor",
        |r| {
            (r.to == "s3")
                .then(|| r.copy_floor_docs_per_sec.zip(r.copy_floor_ratio))
                .flatten()
        },
    );
    let floors: Vec<&Row> = rows
        .iter()
        .filter(|r| r.floor_docs_per_sec.is_some())
        .collect();
    if floors.is_empty() {
        return;
    }
    println!(
        "\nFloors out of S3. Read floor: one raw client (list, one GET per value, list again; \
         the same values as its raw writer and reader). Copy floor: raw clients of both sides, \
         eight copies in flight, each a GET and a raw write to the target, between two listings. \
         Both just before the first round.\n"
    );
    println!(
        "| from → to | raw write docs/s | raw read docs/s | read floor docs/s | read floor ratio | \
         copy floor docs/s | copy floor ratio | migration ratio | migration / read floor | \
         migration / copy floor |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in floors {
        let floor = r.floor_docs_per_sec.unwrap_or(0.0);
        let copy_floor = r.copy_floor_docs_per_sec.unwrap_or(0.0);
        println!(
            "| {} → {} | {:.0} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            r.from,
            r.to,
            r.raw_from_docs_per_sec,
            r.raw_from_read_docs_per_sec,
            floor,
            r.floor_ratio.unwrap_or(0.0),
            copy_floor,
            r.copy_floor_ratio.unwrap_or(0.0),
            r.ratio,
            r.docs_per_sec / floor,
            r.docs_per_sec / copy_floor,
        );
    }
}

/// A table of one floor measured on the target side, pair by pair: `floor`
/// gives a row's floor in docs/s and its ratio to the slower side's raw
/// rate, or `None` where the table has no row for it; `name` names the
/// floor. The raw rate shown beside it is the one its ratio is to (the
/// floor over its ratio): the layout floor's is the last round's baseline
/// after, the copy floor's the first round's before.
fn print_floor_table(
    rows: &[Row],
    title: &str,
    name: &str,
    floor: impl Fn(&Row) -> Option<(f64, f64)>,
) {
    let floors: Vec<(&Row, (f64, f64))> = rows
        .iter()
        .filter_map(|r| floor(r).map(|f| (r, f)))
        .collect();
    if floors.is_empty() {
        return;
    }
    println!("\n{title}\n");
    println!(
        "| from → to | slower side's raw write docs/s (the floor's baseline) | {name} docs/s | \
         {name} ratio | migration ratio | migration / {name} |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (r, (docs_per_sec, ratio)) in floors {
        println!(
            "| {} → {} | {:.0} | {:.0} | {:.2}× | {:.2}× | {:.2}× |",
            r.from,
            r.to,
            docs_per_sec / ratio,
            docs_per_sec,
            ratio,
            r.ratio,
            r.docs_per_sec / docs_per_sec,
        );
    }
}

/// The S3 server's CPU, pair by pair (rows without it are left out).
fn print_server_table(rows: &[Row]) {
    let servers: Vec<(&Row, ServerCpu)> = rows
        .iter()
        .filter_map(|r| r.s3_server.map(|s| (r, s)))
        .collect();
    let unmeasured: Vec<String> = rows
        .iter()
        .filter(|r| r.slower_side == "s3" && r.s3_server.is_none())
        .map(|r| format!("{} → {}", r.from, r.to))
        .collect();
    if !unmeasured.is_empty() {
        println!(
            "\nThe S3 server's CPU was not measured for {} (it needs RUNSTATE_S3_SERVER_PID \
             naming a moto on this machine, which `cargo xtask bench` sets for the moto it \
             starts, and every phase long enough to count a tick of it).",
            unmeasured.join(", ")
        );
    }
    if servers.is_empty() {
        return;
    }
    println!(
        "\nThe S3 server's core: moto's CPU from /proc per request or document in the S3 side's \
         raw single writer (the median round's two baselines, the writes its ratio is to) and \
         reader (just before the first round), the read and copy floors and the median round; \
         its share of one core in the raw writer's baselines, the copy floor and the median \
         round; the machine's busy cores (of {} in /proc/stat) and the migrating process's CPU \
         in that round. The migration's ratio is about the cost \
         factor (raw PUT ms / migration ms) times the share factor (migration share / raw PUT \
         share). Out of S3, the ceiling is the ratio a copy would reach if the server spent \
         all of its core on the read floor's requests (a GET per document, two listings): \
         raw PUT ms / read-floor ms / raw PUT share.\n",
        cpu::cores().map_or_else(|| "?".to_owned(), |n| n.to_string())
    );
    println!(
        "| from → to | server ms per raw PUT | per raw GET | per read-floor doc | \
         per copy-floor doc | per migrated doc | server share: raw PUT / copy floor / migration | \
         busy cores in migration | migrating process ms/doc | cost factor | share factor | \
         ratio | ceiling |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|");
    // A figure with its unit, or a dash where it was not measured.
    let cell = |value: Option<f64>, digits: usize, unit: &str| {
        value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}{unit}"))
    };
    for (r, s) in &servers {
        println!(
            "| {} → {} | {:.2} | {} | {} | {} | {:.2} | {:.0} % / {} / {:.0} % | {} | {} | {:.2}× | {:.2}× | {:.2}× | {} |",
            r.from,
            r.to,
            s.raw_put_ms,
            cell(s.raw_get_ms, 2, ""),
            cell(s.read_floor_ms, 2, ""),
            cell(s.copy_floor_ms, 2, ""),
            s.migration_ms,
            s.raw_put_share * 100.0,
            cell(s.copy_floor_share.map(|v| v * 100.0), 0, " %"),
            s.migration_share * 100.0,
            cell(s.machine_cores, 2, ""),
            cell(s.migrator_ms, 2, ""),
            s.cost_factor,
            s.share_factor,
            r.ratio,
            cell(s.ceiling, 2, "×"),
        );
    }
    // The server's CPU per request varies by a quarter between samples of
    // a few hundred requests; the means over the pairs of one direction
    // say more than any one row. The factors on the line are those of the
    // means (a ratio of means), not means of the rows' factors.
    for (direction, out_of_s3) in [("into S3", false), ("out of S3", true)] {
        let pairs: Vec<&ServerCpu> = servers
            .iter()
            .filter(|(r, _)| (r.from == "s3") == out_of_s3)
            .map(|(_, s)| s)
            .collect();
        let mean = |f: &dyn Fn(&ServerCpu) -> Option<f64>| -> Option<f64> {
            let values: Vec<f64> = pairs.iter().filter_map(|s| f(s)).collect();
            (!values.is_empty() && values.len() == pairs.len())
                .then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        let (Some(put), Some(share), Some(migrated), Some(migration_share)) = (
            mean(&|s| Some(s.raw_put_ms)),
            mean(&|s| Some(s.raw_put_share)),
            mean(&|s| Some(s.migration_ms)),
            mean(&|s| Some(s.migration_share)),
        ) else {
            continue;
        };
        let mut line = format!(
            "\n{direction}, means over {} pairs: server ms per raw PUT {put:.2} (share {:.0} %), \
             per migrated doc {migrated:.2} (share {:.0} %); from these means, cost factor \
             {:.2}× and share factor {:.2}×",
            pairs.len(),
            share * 100.0,
            migration_share * 100.0,
            put / migrated,
            migration_share / share,
        );
        if let Some(copy) = mean(&|s| s.copy_floor_ms) {
            line += &format!("; per copy-floor doc {copy:.2}");
        }
        if let Some(floor) = mean(&|s| s.read_floor_ms) {
            line += &format!(
                "; per read-floor doc {floor:.2}, ceiling {:.2}× (the migration costs the server \
                 {:.2}× the read floor per document)",
                put / floor / share,
                migrated / floor,
            );
        }
        println!("{line}.");
    }
}
