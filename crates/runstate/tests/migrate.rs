//! Migrations through `runstate::open`: every ordered pair of backends
//! copies a run byte-exact, verifies, and re-runs to a no-op; then the
//! guarantees of the migration itself (refusal, overwrite, resume after an
//! interruption, delete-source only after verification, dry run, source
//! lease, detection of writers that do not lock) on the embedded backends.

mod support;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runstate::migrate::{MigrateOptions, Progress, Selection, migrate, sha256_hex, verify};
use runstate::{
    AnyStore, Bytes, Capabilities, DocMeta, DocName, DocStat, ErrorKind, Fence, GetOptions, Lease,
    ListPage, Lock, LockExt, LockInfo, LockKey, Milestones, Owner, PutOptions, PutRequest, Result,
    RunId, Store, StoreExt, StoredDoc, Version, WaitPolicy, async_trait,
};
use support::{Backend, Place, Places, encode, with_option};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a Tokio runtime")
}

/// Runs `body` with a fresh place on each backend, cleans both up whatever
/// happens, then fails if the body failed.
fn with_places<F, Fut>(test: &str, from: Backend, to: Backend, body: F)
where
    F: FnOnce(AnyStore, AnyStore) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (Some(source), Some(target)) = (from.place(test), to.place(test)) else {
        return;
    };
    with_stores(&[&source, &target], (&source.url, &target.url), body);
}

/// Runs `body` with the stores opened at `urls` (source, target), removes
/// every place of `places` whatever happens, then fails if the body
/// failed.
fn with_stores<F, Fut>(places: &[&Place], urls: (&str, &str), body: F)
where
    F: FnOnce(AnyStore, AnyStore) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    runtime().block_on(async {
        let opened = match runstate::open(urls.0).await {
            Ok(source) => runstate::open(urls.1).await.map(|target| (source, target)),
            Err(error) => Err(error),
        };
        let outcome = match opened {
            Ok((source, target)) => Ok(tokio::spawn(body(source, target)).await),
            Err(error) => Err(error),
        };
        for place in places {
            place.cleanup().await;
        }
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(panicked)) => std::panic::resume_unwind(panicked.into_panic()),
            Err(error) => panic!("opening the stores failed: {error}"),
        }
    });
}

fn run(id: &str) -> RunId {
    RunId::new(id).expect("valid run id")
}

fn doc(name: &str) -> DocName {
    DocName::new(name).expect("valid document name")
}

/// Documents that exercise byte-exactness: empty, a real WEPPcloud
/// controller, every byte value, non-ASCII text, and a 1 MiB document.
fn sample() -> Vec<(DocName, Bytes)> {
    let climate = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/fixtures/nodb/Mica_flume1/climate.nodb"),
    )
    .unwrap_or_else(|_| br#"{"py/object": "wepppy.nodb.climate.Climate"}"#.to_vec());
    let every_byte: Vec<u8> = (0..=255u8).cycle().take(64 * 1024 + 3).collect();
    let mut rng = fastrand::Rng::with_seed(7);
    let big: Vec<u8> = (0..1024 * 1024).map(|_| rng.u8(..)).collect();
    vec![
        (doc("empty"), Bytes::new()),
        (doc("climate"), Bytes::from(climate)),
        (doc("binary"), Bytes::from(every_byte)),
        (
            doc("text.utf8"),
            Bytes::from("Ωmega — ünïcödé ✓\n".as_bytes()),
        ),
        (doc("watershed_big"), Bytes::from(big)),
    ]
}

async fn seed(store: &dyn Lock, run: &RunId, docs: &[(DocName, Bytes)]) {
    for (name, bytes) in docs {
        store
            .put_bytes(run, name, bytes.clone())
            .await
            .expect("seed the source");
    }
}

async fn write(store: &dyn Lock, run: &RunId, name: &str, bytes: &'static [u8]) {
    store
        .put_bytes(run, &doc(name), Bytes::from_static(bytes))
        .await
        .expect("write a document");
}

async fn assert_same(target: &dyn Lock, run: &RunId, docs: &[(DocName, Bytes)]) {
    let listed = target.list_all_docs(run).await.expect("list the target");
    assert_eq!(
        listed.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        {
            let mut names: Vec<DocName> = docs.iter().map(|(n, _)| n.clone()).collect();
            names.sort();
            names
        },
        "the target run holds exactly the source's documents"
    );
    for (name, bytes) in docs {
        let got = target
            .get_bytes(run, name)
            .await
            .expect("read the target")
            .unwrap_or_else(|| panic!("{name} missing on the target"));
        assert_eq!(
            sha256_hex(&got.bytes),
            sha256_hex(bytes),
            "{name} is byte-identical"
        );
    }
}

async fn no_locks_left(store: &dyn Lock, run: &RunId) {
    let held = store.list_locks(Some(run)).await.expect("list locks");
    assert!(held.is_empty(), "leases left behind: {held:?}");
}

fn pair(from: Backend, to: Backend, test: &'static str) {
    with_places(test, from, to, |source, target| async move {
        let id = run("Pair_run-1.x");
        let docs = sample();
        seed(&*source, &id, &docs).await;
        // A second run that must not move, since only `id` is selected.
        seed(&*source, &run("left_behind"), &docs[..1]).await;
        let total: u64 = docs.iter().map(|(_, b)| b.len() as u64).sum();
        // Milestones travel with the run, to a millisecond.
        let milestones = source.capabilities().milestones && target.capabilities().milestones;
        if milestones {
            let at = std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_250);
            source.mark(&id, "build_climate", at).await.expect("mark");
            source.set_attr(&id, "has_sbs", "false").await.expect("set");
        }

        let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
        let report = migrate(&*source, &*target, &options, &())
            .await
            .expect("migrate");
        if milestones {
            assert_eq!(report.runs[0].milestones, 2);
            assert_eq!(
                target.milestones(&id).await.expect("target milestones"),
                source.milestones(&id).await.expect("source milestones")
            );
        }
        assert_eq!(report.documents, docs.len() as u64);
        assert_eq!(report.bytes, total);
        assert_eq!(report.verified, docs.len() as u64);
        // S3 returns the MD5 of each body as its ETag: those copies are
        // verified without reading them back; every other target's are
        // read back.
        let by_md5 = if to == Backend::S3 {
            docs.len() as u64
        } else {
            0
        };
        assert_eq!(report.verified_by_md5, by_md5);
        assert_eq!(report.identical, 0);
        assert_same(&*target, &id, &docs).await;
        assert_eq!(
            target.list_all_runs().await.expect("runs"),
            vec![id.clone()]
        );
        no_locks_left(&*source, &id).await;
        no_locks_left(&*target, &id).await;

        let compared = verify(&*source, &*target, &Selection::Runs(vec![id.clone()]), &())
            .await
            .expect("verify");
        assert!(compared.identical(), "{:?}", compared.differences);
        assert_eq!(compared.documents, docs.len() as u64);

        // Running it again finds everything there and changes nothing.
        let versions_before = target.list_all_docs(&id).await.expect("list");
        let again = migrate(&*source, &*target, &options, &())
            .await
            .expect("migrate again");
        assert_eq!((again.documents, again.identical), (0, docs.len() as u64));
        assert_eq!(
            again.runs[0].milestones, 0,
            "milestones already there are not set again"
        );
        assert_eq!(
            target.list_all_docs(&id).await.expect("list"),
            versions_before
        );
        assert_same(&*source, &id, &docs).await;
    });
}

macro_rules! pairs {
    ($($name:ident: $from:ident -> $to:ident,)*) => {
        $(
            #[test]
            fn $name() {
                pair(Backend::$from, Backend::$to, stringify!($name));
            }
        )*
    };
}

pairs! {
    file_to_sqlite: File -> Sqlite,
    file_to_postgres: File -> Postgres,
    file_to_mysql: File -> Mysql,
    file_to_redis: File -> Redis,
    file_to_s3: File -> S3,
    sqlite_to_file: Sqlite -> File,
    sqlite_to_postgres: Sqlite -> Postgres,
    sqlite_to_mysql: Sqlite -> Mysql,
    sqlite_to_redis: Sqlite -> Redis,
    sqlite_to_s3: Sqlite -> S3,
    postgres_to_file: Postgres -> File,
    postgres_to_sqlite: Postgres -> Sqlite,
    postgres_to_mysql: Postgres -> Mysql,
    postgres_to_redis: Postgres -> Redis,
    postgres_to_s3: Postgres -> S3,
    mysql_to_file: Mysql -> File,
    mysql_to_sqlite: Mysql -> Sqlite,
    mysql_to_postgres: Mysql -> Postgres,
    mysql_to_redis: Mysql -> Redis,
    mysql_to_s3: Mysql -> S3,
    redis_to_file: Redis -> File,
    redis_to_sqlite: Redis -> Sqlite,
    redis_to_postgres: Redis -> Postgres,
    redis_to_mysql: Redis -> Mysql,
    redis_to_s3: Redis -> S3,
    s3_to_file: S3 -> File,
    s3_to_sqlite: S3 -> Sqlite,
    s3_to_postgres: S3 -> Postgres,
    s3_to_mysql: S3 -> Mysql,
    s3_to_redis: S3 -> Redis,
}

/// Small documents for the scenario tests.
fn small() -> Vec<(DocName, Bytes)> {
    ["ron", "climate", "landuse", "soils", "watershed", "wepp"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                doc(name),
                Bytes::from(format!("{{\"{name}\": {i}}}").into_bytes()),
            )
        })
        .collect()
}

#[test]
fn differing_target_is_refused_untouched_then_overwritten() {
    with_places(
        "differing_target",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Mica_flume1");
            let docs = small();
            seed(&*source, &id, &docs).await;
            write(&*target, &id, "ron", b"{\"other\": true}").await;
            write(&*target, &id, "unrelated", b"{}").await;
            let before = target.list_all_docs(&id).await.expect("list");

            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let error = migrate(&*source, &*target, &options, &())
                .await
                .expect_err("a differing target is refused");
            assert_eq!(error.kind(), ErrorKind::AlreadyExists, "{error}");
            assert_eq!(error.run(), Some(&id));
            assert!(error.to_string().contains("--overwrite"), "{error}");
            assert_eq!(
                target.list_all_docs(&id).await.expect("list"),
                before,
                "nothing written"
            );
            let dry = migrate(&*source, &*target, &options.clone().with_dry_run(true), &())
                .await
                .expect_err("a dry run says the same");
            assert_eq!(dry.kind(), ErrorKind::AlreadyExists);

            let report = migrate(&*source, &*target, &options.with_overwrite(true), &())
                .await
                .expect("overwrite");
            assert_eq!(report.runs[0].replaced, 1);
            assert_eq!(report.runs[0].removed, 1);
            assert_eq!(report.runs[0].copied, docs.len() as u64 - 1);
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// Wraps a store and misbehaves on request, to interrupt migrations.
struct Hooked {
    inner: Arc<dyn Lock>,
    /// Puts that succeed before every later one fails.
    puts_before_failure: Option<u64>,
    puts: AtomicU64,
    /// Reads return altered bytes.
    corrupt_reads: bool,
    /// Puts of this document fail at once; every other put waits first.
    fail_doc_others_slow: Option<(DocName, Duration)>,
    /// Every put waits this long first.
    slow_puts: Option<Duration>,
    /// On the second read, overwrite this document without any lock.
    sneak_write: Mutex<Option<(RunId, DocName)>>,
    gets: AtomicU64,
    /// Deletes are made, then reported failed (a reply cut off by a
    /// timeout).
    deletes_made_then_fail: bool,
    /// After the first read of the milestones, mark this task (as a worker
    /// does, without any lock).
    sneak_mark: Mutex<Option<(RunId, String)>>,
    /// After the first delete, mark this task.
    mark_on_delete: Mutex<Option<(RunId, String)>>,
    /// Every delete waits this long first.
    slow_deletes: Option<Duration>,
    /// Marks that succeed before every later one fails (retryably).
    marks_before_failure: Option<u64>,
    marks: AtomicU64,
    /// As a source: deletes are reported here. As a target: renewals are
    /// refused once the source deleted something (see [`Lapse`]).
    lapse: Option<(Arc<Lapse>, bool)>,
    /// The first `n` renewals fail, retryably, as a dropped connection's
    /// do; with `true`, each is made on the store first (its reply lost).
    renewals_fail: Option<(u64, bool)>,
    renewals: AtomicU64,
}

/// Shared by a test's two hooked stores: the target refuses to renew
/// leases once the source has deleted a document, and the source counts
/// the deletes it starts after that refusal.
#[derive(Default)]
struct Lapse {
    deleted: AtomicBool,
    refused: AtomicBool,
    deletes_after: AtomicU64,
}

impl Hooked {
    fn new(inner: Arc<dyn Lock>) -> Self {
        Hooked {
            inner,
            puts_before_failure: None,
            puts: AtomicU64::new(0),
            corrupt_reads: false,
            fail_doc_others_slow: None,
            slow_puts: None,
            sneak_write: Mutex::new(None),
            gets: AtomicU64::new(0),
            deletes_made_then_fail: false,
            sneak_mark: Mutex::new(None),
            mark_on_delete: Mutex::new(None),
            slow_deletes: None,
            marks_before_failure: None,
            marks: AtomicU64::new(0),
            lapse: None,
            renewals_fail: None,
            renewals: AtomicU64::new(0),
        }
    }

    /// Marks the task `slot` holds, once, as a worker does (without any
    /// lock).
    async fn mark_once(&self, slot: &Mutex<Option<(RunId, String)>>) -> Result<()> {
        let asked = slot.lock().expect("not poisoned").take();
        match asked {
            Some((run, task)) => {
                self.inner
                    .mark(&run, &task, std::time::SystemTime::now())
                    .await
            }
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Hooked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooked")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Store for Hooked {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        if self.gets.fetch_add(1, Ordering::SeqCst) == 1 {
            let sneak = self.sneak_write.lock().expect("not poisoned").take();
            if let Some((run, doc)) = sneak {
                self.inner
                    .put_bytes(&run, &doc, Bytes::from_static(b"{\"sneaked\": 1}"))
                    .await?;
            }
        }
        let found = self.inner.get(run, doc, options).await?;
        Ok(match (self.corrupt_reads, found) {
            (true, Some(mut stored)) => {
                let mut bytes = stored.bytes.to_vec();
                bytes.push(b'!');
                stored.bytes = Bytes::from(bytes);
                Some(stored)
            }
            (_, found) => found,
        })
    }
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        if let Some((failing, delay)) = &self.fail_doc_others_slow {
            if failing == doc {
                return Err(runstate::Error::new(
                    ErrorKind::Backend,
                    "injected: disk full",
                ));
            }
            // Like a statement a database already has, or a file write on
            // a blocking thread: dropping the caller's future does not stop
            // it.
            assert!(options.lease.is_none(), "the slow path takes no lease");
            let (inner, run, doc, mode, delay) = (
                Arc::clone(&self.inner),
                run.clone(),
                doc.clone(),
                options.mode.clone(),
                *delay,
            );
            let write = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                inner.put(&run, &doc, bytes, PutOptions::mode(mode)).await
            });
            return write.await.expect("the write task");
        }
        if let Some(delay) = self.slow_puts {
            tokio::time::sleep(delay).await;
        }
        let done = self.puts.fetch_add(1, Ordering::SeqCst);
        if self.puts_before_failure.is_some_and(|limit| done >= limit) {
            return Err(
                runstate::Error::new(ErrorKind::Backend, "injected: connection reset")
                    .set_retryable(true),
            );
        }
        self.inner.put(run, doc, bytes, options).await
    }
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        if let Some((lapse, false)) = &self.lapse
            && lapse.refused.load(Ordering::SeqCst)
        {
            lapse.deletes_after.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(pause) = self.slow_deletes {
            tokio::time::sleep(pause).await;
        }
        let deleted = self.inner.delete(run, doc, if_version).await;
        if let Some((lapse, false)) = &self.lapse {
            lapse.deleted.store(true, Ordering::SeqCst);
        }
        self.mark_once(&self.mark_on_delete).await?;
        if self.deletes_made_then_fail && deleted.is_ok() {
            return Err(runstate::Error::new(
                ErrorKind::Timeout,
                "the reply did not come in time",
            ));
        }
        deleted
    }
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.inner.list_docs(run, after, limit).await
    }
    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.inner.list_runs(after, limit).await
    }
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        self.inner.delete_run(run).await
    }
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        let read = self.inner.milestones(run).await?;
        self.mark_once(&self.sneak_mark).await?;
        Ok(read)
    }
    async fn mark(&self, run: &RunId, task: &str, at: std::time::SystemTime) -> Result<()> {
        let made = self.marks.fetch_add(1, Ordering::SeqCst);
        if self.marks_before_failure.is_some_and(|n| made >= n) {
            return Err(runstate::Error::new(
                ErrorKind::Backend,
                "the mark failed (the test's hook)",
            )
            .set_retryable(true));
        }
        self.inner.mark(run, task, at).await
    }
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.inner.set_attr(run, name, value).await
    }
}

#[async_trait]
impl Lock for Hooked {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.inner.try_acquire(key, owner, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        if let Some((lapse, true)) = &self.lapse
            && lapse.deleted.load(Ordering::SeqCst)
        {
            lapse.refused.store(true, Ordering::SeqCst);
            return Err(runstate::Error::new(
                ErrorKind::LeaseLost,
                "the renewal was refused (the test's hook)",
            ));
        }
        if let Some((failing, made)) = self.renewals_fail
            && self.renewals.fetch_add(1, Ordering::SeqCst) < failing
        {
            if made {
                self.inner.renew(lease, ttl).await?;
            }
            return Err(runstate::Error::new(
                ErrorKind::Backend,
                "the renewal's connection dropped (the test's hook)",
            )
            .set_retryable(true));
        }
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        self.inner.break_lock(key, only_fence).await
    }
    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        self.inner.list_locks(run).await
    }
}

#[test]
fn interrupted_migration_resumes_to_the_same_state() {
    with_places(
        "resume",
        Backend::Sqlite,
        Backend::File,
        |source, target| async move {
            let id = run("CedarRiver_Obs.MultDaymet");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_concurrency(1);

            let mut flaky = Hooked::new(Arc::clone(target.lock()));
            flaky.puts_before_failure = Some(2);
            let error = migrate(&*source, &flaky, &options, &())
                .await
                .expect_err("the target fails mid-way");
            assert_eq!(error.kind(), ErrorKind::Backend);
            assert_eq!(error.run(), Some(&id));
            assert_eq!(
                target.list_all_docs(&id).await.expect("list").len(),
                2,
                "a partial copy"
            );
            no_locks_left(&*target, &id).await;

            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("the second run resumes");
            assert_eq!(
                (report.runs[0].identical, report.runs[0].copied),
                (2, docs.len() as u64 - 2)
            );
            assert_same(&*target, &id, &docs).await;
            let again = migrate(&*source, &*target, &options, &())
                .await
                .expect("third run");
            assert_eq!(again.documents, 0);
        },
    );
}

#[test]
fn a_failed_migration_leaves_no_write_in_flight() {
    with_places(
        "no_write_in_flight",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("In_flight");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let mut failing = Hooked::new(Arc::clone(target.lock()));
            failing.fail_doc_others_slow = Some((doc("climate"), Duration::from_millis(150)));
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let error = migrate(&*source, &failing, &options, &())
                .await
                .expect_err("fails");
            assert_eq!(error.doc(), Some(&doc("climate")), "{error}");
            let at_return = target.list_all_docs(&id).await.expect("list");
            tokio::time::sleep(Duration::from_millis(400)).await;
            assert_eq!(
                target.list_all_docs(&id).await.expect("list"),
                at_return,
                "every write had landed before migrate returned"
            );
            no_locks_left(&*target, &id).await;
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("resume");
            assert_eq!(report.runs[0].identical, at_return.len() as u64);
            assert_same(&*target, &id, &docs).await;
        },
    );
}

#[test]
fn source_is_deleted_only_after_verification() {
    with_places(
        "delete_source",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("prescribed_fire.landuse");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);

            let mut lying = Hooked::new(Arc::clone(target.lock()));
            lying.corrupt_reads = true;
            let error = migrate(&*source, &lying, &options, &())
                .await
                .expect_err("verification fails");
            assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
            assert!(error.doc().is_some(), "names the document: {error}");
            assert_same(&*source, &id, &docs).await;

            // The real target: the partial copy is resumed, verified, and only
            // then is the source deleted.
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("move");
            assert!(report.runs[0].source_deleted);
            assert_same(&*target, &id, &docs).await;
            assert!(source.list_all_docs(&id).await.expect("list").is_empty());
            no_locks_left(&*source, &id).await;

            // A move interrupted after the deletes resumes too: nothing to do.
            let again = migrate(&*source, &*target, &options, &())
                .await
                .expect("again");
            assert_eq!(again.documents, 0);
            assert_same(&*target, &id, &docs).await;
            // Without --delete-source an empty source run is simply not there.
            let plain = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let missing = migrate(&*source, &*target, &plain, &())
                .await
                .expect_err("gone");
            assert_eq!(missing.kind(), ErrorKind::NotFound);
        },
    );
}

/// A move run again after it finished finds the source run empty and
/// treats it as a move to resume; the source still holds the run's
/// milestones and attributes (a move deletes documents), now older than
/// the target's. They must not be written over the target's (before: the
/// target's `status` went back to the source's, with no error).
#[test]
fn a_finished_move_run_again_keeps_the_targets_newer_milestones() {
    with_places(
        "move_again_milestones",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("move-again");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let first =
                std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_000);
            source.mark(&id, "wepp_run", first).await.expect("mark");
            source
                .set_attr(&id, "status", "running")
                .await
                .expect("set");
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let moved = migrate(&*source, &*target, &options, &())
                .await
                .expect("move");
            assert!(moved.runs[0].source_deleted);
            assert_eq!(moved.runs[0].milestones, 2);

            // Workers go on with the run on the target.
            let later = first + Duration::from_secs(3600);
            target.mark(&id, "wepp_run", later).await.expect("mark");
            target.set_attr(&id, "status", "done").await.expect("set");
            // A milestone the target lacks is still filled in.
            source.set_attr(&id, "late", "yes").await.expect("set");

            let again = migrate(&*source, &*target, &options, &())
                .await
                .expect("move again");
            assert_eq!(again.documents, 0);
            let kept = target.milestones(&id).await.expect("milestones");
            assert_eq!(kept.attrs.get("status").map(String::as_str), Some("done"));
            assert_eq!(kept.timestamps.get("wepp_run"), Some(&later));
            assert_eq!(kept.attrs.get("late").map(String::as_str), Some("yes"));
            assert_eq!(again.runs[0].milestones, 1, "only the one it lacked");
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// A milestone marked again on the source while a move deleted its
/// documents, whose late copy failed, is copied by the next run: the move
/// keeps the last source document until the late copy is made (before:
/// every document was gone, the next run took the empty source for a
/// finished move and kept the target's older time).
#[test]
fn a_move_whose_late_milestones_failed_copies_them_when_run_again() {
    with_places(
        "move_late_milestone_failed",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("late-milestone");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let first =
                std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_000);
            source.mark(&id, "wepp_run", first).await.expect("mark");
            let marking_source = Hooked::new(Arc::clone(source.lock()));
            *marking_source.mark_on_delete.lock().expect("not poisoned") =
                Some((id.clone(), "wepp_run".to_owned()));
            let mut failing_target = Hooked::new(Arc::clone(target.lock()));
            failing_target.marks_before_failure = Some(1);
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let error = migrate(&marking_source, &failing_target, &options, &())
                .await
                .expect_err("the late copy failed");
            assert!(error.is_retryable(), "{error}");
            let again = migrate(&*source, &*target, &options, &())
                .await
                .expect("move again");
            assert!(again.runs[0].source_deleted);
            assert_eq!(
                target.milestones(&id).await.expect("target").timestamps,
                source.milestones(&id).await.expect("source").timestamps,
                "the source's later mark reached the target"
            );
            assert_ne!(
                target
                    .milestones(&id)
                    .await
                    .expect("target")
                    .timestamps
                    .get("wepp_run"),
                Some(&first)
            );
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// A move deletes source documents only while it holds both runs' leases:
/// once the target's lease is lost (a renewal refused: someone broke it
/// and may be changing the copies), no further source document is
/// deleted (before: deletes went on while the source's lease, renewed a
/// moment earlier, had not expired).
#[test]
fn a_move_stops_deleting_once_the_target_lease_is_lost() {
    with_places(
        "move_target_lease_lost",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("target-lease-lost");
            let docs: Vec<(DocName, Bytes)> = (0..12)
                .map(|i| (doc(&format!("d{i:02}")), Bytes::from(vec![b'x'; 64])))
                .collect();
            seed(&*source, &id, &docs).await;
            let lapse = Arc::new(Lapse::default());
            let mut slow_source = Hooked::new(Arc::clone(source.lock()));
            slow_source.slow_deletes = Some(Duration::from_millis(300));
            slow_source.lapse = Some((Arc::clone(&lapse), false));
            let mut refusing_target = Hooked::new(Arc::clone(target.lock()));
            refusing_target.lapse = Some((Arc::clone(&lapse), true));
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]))
                .with_delete_source(true)
                .with_ttl(Duration::from_millis(1500));
            let error = migrate(&slow_source, &refusing_target, &options, &())
                .await
                .expect_err("the target's lease was lost");
            assert_eq!(error.kind(), ErrorKind::LeaseLost, "{error}");
            assert!(
                lapse.refused.load(Ordering::SeqCst),
                "a renewal was refused"
            );
            assert!(
                lapse.deletes_after.load(Ordering::SeqCst) <= 1,
                "deletes started after the target's lease was lost: {}",
                lapse.deletes_after.load(Ordering::SeqCst)
            );
            // Every document is still on one side or the other.
            let left = source.list_all_docs(&id).await.expect("list").len();
            assert!(left >= 1, "the move stopped before the end");
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// A renewal that failed without a refusal (a dropped connection) is tried
/// again: the migration goes on under its lease. Before, any renewal error
/// marked the lease lost, and the next step failed with `LeaseLost`.
#[test]
fn a_renewal_that_failed_once_is_tried_again() {
    with_places(
        "renewal_failed_once",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("renewal-failed-once");
            let docs = small()[..2].to_vec();
            seed(&*source, &id, &docs).await;
            let mut flaky = Hooked::new(Arc::clone(target.lock()));
            // Two puts of 400 ms, one at a time, under a 600 ms lease whose
            // first renewal (at 200 ms) fails.
            flaky.slow_puts = Some(Duration::from_millis(400));
            flaky.renewals_fail = Some((1, false));
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]))
                .with_ttl(Duration::from_millis(600))
                .with_concurrency(1);
            let report = migrate(&*source, &flaky, &options, &())
                .await
                .expect("a failed renewal was tried again");
            assert_eq!(report.documents, docs.len() as u64);
            assert!(flaky.renewals.load(Ordering::SeqCst) >= 2, "renewed again");
            assert_same(&*target, &id, &docs).await;
            no_locks_left(&*target, &id).await;
        },
    );
}

/// A lease whose renewals all failed (each made on the store, its reply
/// lost) expires locally and the migration stops with `LeaseLost`, but
/// the lease is released: the store may still hold it, extended by the
/// renewals it made, and would keep the run locked. Before, the first
/// failed renewal marked it lost, and a lost lease was never released.
#[test]
fn a_lease_whose_renewal_replies_were_lost_is_released() {
    with_places(
        "renewal_replies_lost",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("renewal-replies-lost");
            let docs = small()[..3].to_vec();
            seed(&*source, &id, &docs).await;
            let mut flaky = Hooked::new(Arc::clone(target.lock()));
            // Three puts of 400 ms under a 600 ms lease: the third finds it
            // expired.
            flaky.slow_puts = Some(Duration::from_millis(400));
            flaky.renewals_fail = Some((u64::MAX, true));
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]))
                .with_ttl(Duration::from_millis(600))
                .with_concurrency(1);
            let error = migrate(&*source, &flaky, &options, &())
                .await
                .expect_err("no renewal came back");
            assert_eq!(error.kind(), ErrorKind::LeaseLost, "{error}");
            let held = target
                .lock()
                .inspect(&LockKey::Run(id.clone()))
                .await
                .expect("inspect");
            assert!(held.is_none(), "the run is still locked: {held:?}");
        },
    );
}

#[test]
fn dry_run_writes_nothing() {
    with_places(
        "dry_run",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("rlew-appreciated-tremolo");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let options = MigrateOptions::new(Selection::All).with_dry_run(true);
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("dry run");
            assert!(report.dry_run);
            assert_eq!(report.runs[0].copied, docs.len() as u64);
            assert_eq!(
                report.bytes,
                docs.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
            );
            assert!(target.list_all_runs().await.expect("runs").is_empty());
        },
    );
}

/// Records who holds the run's lock on both sides while documents are
/// copied.
struct Watch {
    source: Arc<dyn Lock>,
    target: Arc<dyn Lock>,
    key: LockKey,
    holders: Mutex<Vec<(Option<String>, Option<String>)>>,
}

impl Progress for Watch {
    fn document_done(&self, _run: &RunId, _doc: &DocName, _bytes: u64) {
        // Progress callbacks are synchronous; the tests run on a
        // multi-threaded runtime, where blocking a worker briefly is allowed.
        let seen = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let holder = |info: Result<Option<LockInfo>>| {
                    info.expect("inspect").map(|i| i.owner.id().to_owned())
                };
                (
                    holder(self.source.inspect(&self.key).await),
                    holder(self.target.inspect(&self.key).await),
                )
            })
        });
        self.holders.lock().expect("not poisoned").push(seen);
    }
}

#[test]
fn the_run_is_locked_on_both_sides_for_the_copy() {
    with_places(
        "run_leases",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Test_Watershed_15");
            seed(&*source, &id, &small()).await;
            let key = LockKey::Run(id.clone());

            // Someone else holds the run: the migration waits, then gives up.
            let other = Owner::for_this_process();
            let held = source
                .try_acquire(&key, &other, Duration::from_secs(30))
                .await
                .expect("hold the run");
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]))
                .with_wait(WaitPolicy::with_timeout(Duration::from_millis(200)));
            let error = migrate(&*source, &*target, &options, &())
                .await
                .expect_err("locked");
            assert_eq!(error.kind(), ErrorKind::Locked);
            assert_eq!(error.holder().map(|h| h.owner.id()), Some(other.id()));
            assert!(target.list_all_runs().await.expect("runs").is_empty());
            source.release(&held).await.expect("release");

            // While documents are copied, the migration holds both runs.
            let migrating = Owner::for_this_process();
            let watch = Watch {
                source: Arc::clone(source.lock()),
                target: Arc::clone(target.lock()),
                key: key.clone(),
                holders: Mutex::new(Vec::new()),
            };
            // One document at a time: the watcher blocks the migration's task,
            // and documents in flight would hold pooled connections meanwhile.
            let options = options.with_owner(migrating.clone()).with_concurrency(1);
            let report = migrate(&*source, &*target, &options, &watch)
                .await
                .expect("migrate");
            assert_eq!(report.documents, small().len() as u64);
            let holders = watch.holders.into_inner().expect("not poisoned");
            assert_eq!(holders.len(), small().len());
            let expected = Some(migrating.id().to_owned());
            assert!(
                holders
                    .iter()
                    .all(|(s, t)| *s == expected && *t == expected),
                "{holders:?}"
            );
            // And after it both are free at once.
            for store in [&*source, &*target] {
                let lease = store
                    .acquire(&key, &other, Duration::from_secs(5), &WaitPolicy::no_wait())
                    .await
                    .expect("free after the migration");
                store.release(&lease).await.expect("release");
            }
        },
    );
}

/// A move onto the very documents of its source, opened a second time by
/// the URL `second` makes of the source's: every document is found
/// identical on the target, so the move used to "verify" and then delete
/// the only copy of every document. The first one deleted is now missed
/// on the target: it is written back, and the move stops with
/// `InvalidArgument` naming it, every document kept and no lock left.
/// With `cut_off`, the source's deletes are made but reported failed (a
/// reply cut off by a timeout): the target is checked all the same, and
/// the delete's error is the refusal's source.
fn moved_onto_its_own_documents(test: &str, second: fn(&str) -> String, id: &str, cut_off: bool) {
    let Some(place) = Backend::File.place(test) else {
        return;
    };
    let id = run(id);
    with_stores(
        &[&place],
        (&place.url, &second(&place.url)),
        |source, target| async move {
            let docs = small();
            seed(&*source, &id, &docs).await;
            let mut hooked = Hooked::new(Arc::clone(source.lock()));
            hooked.deletes_made_then_fail = cut_off;
            let from: &dyn Lock = if cut_off { &hooked } else { &*source };
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let error = migrate(from, &*target, &options, &())
                .await
                .expect_err("the same documents");
            assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
            assert_eq!(error.run(), Some(&id), "{error}");
            assert!(error.doc().is_some(), "names the document: {error}");
            if cut_off {
                assert!(
                    runstate::display_chain(&error).contains("did not come in time"),
                    "the delete's error is its source: {}",
                    runstate::display_chain(&error)
                );
            }
            assert_same(&*source, &id, &docs).await;
            no_locks_left(&*source, &id).await;
        },
    );
}

/// The same URL, opened twice (the CLI refuses only the same text): the
/// target's lease is the source lease handed back.
#[test]
fn a_move_onto_its_own_store_is_refused() {
    moved_onto_its_own_documents("own_store", str::to_owned, "Test_Watershed_16", false);
}

/// The same documents with their locks elsewhere (`?locks=memory://`):
/// the two leases come from two lock services and both pass. It used to
/// delete every document of the run.
#[test]
fn a_move_onto_its_own_documents_with_other_locks_deletes_nothing() {
    fn other_locks(url: &str) -> String {
        with_option(url, &format!("locks={}", encode("memory://")))
    }
    moved_onto_its_own_documents("own_docs", other_locks, "Test_Watershed_17", false);
}

/// A source delete made but reported failed: it used to return at the
/// failed delete, the document gone from both.
#[test]
fn a_delete_made_but_reported_failed_is_checked_too() {
    moved_onto_its_own_documents("own_docs_timeout", str::to_owned, "Test_Watershed_19", true);
}

/// Two stores whose documents differ but whose leases come from one lock
/// service (`?locks=` naming the same SQLite database): the target's run
/// lease is the source's grant handed back to its owner, and the move is
/// made, deleting the source's documents only, since the target keeps its
/// own.
#[test]
fn a_move_between_stores_sharing_one_lock_service_is_made() {
    let test = "shared_locks";
    let (Some(from), Some(to), Some(locks)) = (
        Backend::File.place(test),
        Backend::File.place(test),
        Backend::Sqlite.place(test),
    ) else {
        return;
    };
    let with_locks = |url: &str| with_option(url, &format!("locks={}", encode(&locks.url)));
    with_stores(
        &[&from, &to, &locks],
        (&with_locks(&from.url), &with_locks(&to.url)),
        |source, target| async move {
            let id = run("Test_Watershed_18");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("the move");
            assert!(report.runs[0].source_deleted);
            assert_same(&*target, &id, &docs).await;
            assert!(source.list_all_docs(&id).await.expect("list").is_empty());
            no_locks_left(&*target, &id).await;
        },
    );
}

/// A milestone marked after the run's milestones were copied (workers mark
/// them without any lock) fails the move before anything is deleted. The
/// move used to succeed and delete the source's documents, the milestone
/// missing on the target.
#[test]
fn a_milestone_marked_during_a_move_is_caught() {
    with_places(
        "sneaky_mark",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Marked");
            let docs = small();
            seed(&*source, &id, &docs).await;
            source
                .mark(&id, "climate_built", std::time::SystemTime::now())
                .await
                .expect("mark");
            let hooked = Hooked::new(Arc::clone(source.lock()));
            *hooked.sneak_mark.lock().expect("not poisoned") =
                Some((id.clone(), "wepp_run".into()));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let error = migrate(&hooked, &*target, &options, &())
                .await
                .expect_err("the mark is caught");
            assert_eq!(error.kind(), ErrorKind::Precondition, "{error}");
            assert!(
                error.to_string().contains("milestone `wepp_run`"),
                "{error}"
            );
            assert_same(&*source, &id, &docs).await;
            no_locks_left(&*source, &id).await;
            // Run again, the move copies the milestone and is made.
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("the move");
            assert!(report.runs[0].source_deleted);
            let marked = target.milestones(&id).await.expect("milestones");
            assert!(
                ["climate_built", "wepp_run"]
                    .iter()
                    .all(|task| marked.timestamps.contains_key(*task)),
                "{marked:?}"
            );
        },
    );
}

/// A milestone marked while a move deletes the source's documents (after
/// the final check) is copied to the target once the deletions are done.
/// It used to stay behind on the emptied source run.
#[test]
fn a_milestone_marked_while_a_move_deletes_reaches_the_target() {
    with_places(
        "late_mark",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("MarkedLate");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let hooked = Hooked::new(Arc::clone(source.lock()));
            *hooked.mark_on_delete.lock().expect("not poisoned") =
                Some((id.clone(), "wepp_run".into()));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let report = migrate(&hooked, &*target, &options, &())
                .await
                .expect("the move");
            assert!(report.runs[0].source_deleted);
            assert_eq!(report.runs[0].milestones, 1);
            assert_same(&*target, &id, &docs).await;
            let marked = target.milestones(&id).await.expect("milestones");
            assert!(marked.timestamps.contains_key("wepp_run"), "{marked:?}");
        },
    );
}

#[test]
fn a_writer_that_does_not_lock_is_detected() {
    with_places(
        "sneaky_writer",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Sneaky");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let hooked = Hooked::new(Arc::clone(source.lock()));
            *hooked.sneak_write.lock().expect("not poisoned") = Some((id.clone(), doc("ron")));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_concurrency(1);
            let error = migrate(&hooked, &*target, &options, &())
                .await
                .expect_err("the change is caught");
            assert_eq!(error.kind(), ErrorKind::Precondition, "{error}");
            assert!(error.to_string().contains("changed"), "{error}");
            no_locks_left(&*source, &id).await;
        },
    );
}

/// A document changed by a writer that does not lock after it was copied
/// is caught by the final listing of the source, and the error names it
/// (it named none: with as many documents before as after, "listed 6
/// documents before and 6 after" told nothing).
#[test]
fn a_change_after_the_copy_is_named() {
    with_places(
        "sneaky_late_writer",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Sneaky_late");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let hooked = Hooked::new(Arc::clone(source.lock()));
            // Written on the second read, once the first document (copied
            // alone, one at a time) is already on the target.
            let first = docs
                .iter()
                .map(|(name, _)| name)
                .min()
                .expect("documents")
                .clone();
            *hooked.sneak_write.lock().expect("not poisoned") = Some((id.clone(), first.clone()));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_concurrency(1);
            let error = migrate(&hooked, &*target, &options, &())
                .await
                .expect_err("the change is caught");
            assert_eq!(error.kind(), ErrorKind::Precondition, "{error}");
            assert_eq!(error.doc(), Some(&first), "{error}");
            no_locks_left(&*source, &id).await;
        },
    );
}

#[test]
fn all_runs_and_missing_runs() {
    with_places(
        "all_runs",
        Backend::Sqlite,
        Backend::File,
        |source, target| async move {
            let ids: Vec<RunId> = (0..5).map(|i| run(&format!("run-{i}"))).collect();
            for id in &ids {
                seed(&*source, id, &small()[..2]).await;
            }
            let report = migrate(
                &*source,
                &*target,
                &MigrateOptions::new(Selection::All),
                &(),
            )
            .await
            .expect("all");
            assert_eq!(report.runs.len(), 5);
            assert_eq!(report.documents, 10);
            assert_eq!(target.list_all_runs().await.expect("runs"), ids);
            let compared = verify(&*source, &*target, &Selection::All, &())
                .await
                .expect("verify");
            assert!(compared.identical());
            assert_eq!(compared.runs, 5);

            let missing = MigrateOptions::new(Selection::Runs(vec![run("no-such-run")]));
            let error = migrate(&*source, &*target, &missing, &())
                .await
                .expect_err("missing");
            assert_eq!(error.kind(), ErrorKind::NotFound);
            assert_eq!(error.run(), Some(&run("no-such-run")));
        },
    );
}

#[test]
fn verify_reports_every_kind_of_difference() {
    with_places(
        "verify_diff",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Diff");
            let docs = small();
            seed(&*source, &id, &docs).await;
            migrate(
                &*source,
                &*target,
                &MigrateOptions::new(Selection::All),
                &(),
            )
            .await
            .expect("migrate");
            target.delete(&id, &doc("ron"), None).await.expect("delete");
            write(&*target, &id, "wepp", b"{\"wepp\": 99}").await;
            write(&*target, &id, "zzz_extra", b"{}").await;
            let report = verify(&*source, &*target, &Selection::All, &())
                .await
                .expect("verify");
            let kinds: Vec<String> = report
                .differences
                .iter()
                .map(|d| {
                    d.to_string()
                        .split(": ")
                        .nth(1)
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            assert_eq!(report.differences.len(), 3, "{kinds:?}");
            assert!(kinds[0].starts_with("missing on target"), "{kinds:?}");
            assert!(kinds[1].starts_with("differs"), "{kinds:?}");
            assert!(kinds[2].starts_with("only on target"), "{kinds:?}");
        },
    );
}

#[test]
fn a_finished_move_run_again_changes_nothing() {
    with_places(
        "finished_move",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Moved");
            let docs = small();
            seed(&*source, &id, &docs).await;
            // The run named twice is moved once.
            let twice = Selection::Runs(vec![id.clone(), id.clone()]);
            let options = MigrateOptions::new(twice).with_delete_source(true);
            let report = migrate(&*source, &*target, &options, &())
                .await
                .expect("move");
            assert_eq!(report.runs.len(), 1);
            assert_same(&*target, &id, &docs).await;
            // Again, even with --overwrite: the target copies are the only
            // ones left and stay.
            let again = migrate(&*source, &*target, &options.with_overwrite(true), &())
                .await
                .expect("again");
            assert_eq!((again.documents, again.runs[0].removed), (0, 0));
            assert_same(&*target, &id, &docs).await;
        },
    );
}

#[test]
fn a_move_interrupted_while_deleting_resumes_without_loss() {
    with_places(
        "half_deleted_move",
        Backend::Sqlite,
        Backend::File,
        |source, target| async move {
            let id = run("Half_moved");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let plain = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            migrate(&*source, &*target, &plain, &())
                .await
                .expect("copy");
            // As if killed after deleting half of the source.
            for (name, _) in &docs[..3] {
                source.delete(&id, name, None).await.expect("delete");
            }
            let refused = migrate(&*source, &*target, &plain, &())
                .await
                .expect_err("extras");
            assert_eq!(refused.kind(), ErrorKind::AlreadyExists);
            let resumed = plain.with_delete_source(true).with_overwrite(true);
            let report = migrate(&*source, &*target, &resumed, &())
                .await
                .expect("resume");
            assert!(report.runs[0].source_deleted);
            assert_eq!(report.runs[0].removed, 0);
            assert_same(&*target, &id, &docs).await;
            assert!(source.list_all_docs(&id).await.expect("list").is_empty());
        },
    );
}

#[test]
fn a_move_into_an_unrelated_run_is_refused() {
    with_places(
        "unrelated_target",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Unrelated");
            seed(&*source, &id, &small()).await;
            write(&*target, &id, "someone_elses", b"{}").await;
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let error = migrate(&*source, &*target, &options, &())
                .await
                .expect_err("refused");
            assert_eq!(error.kind(), ErrorKind::AlreadyExists, "{error}");
            assert_eq!(
                source.list_all_docs(&id).await.expect("list").len(),
                small().len()
            );
            assert_eq!(target.list_all_docs(&id).await.expect("list").len(), 1);
        },
    );
}

#[test]
fn leases_are_renewed_while_a_slow_copy_runs() {
    with_places(
        "slow_copy",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Slow");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let mut slow = Hooked::new(Arc::clone(target.lock()));
            slow.slow_puts = Some(Duration::from_millis(150));
            // Six puts of 150 ms, one at a time, under a 300 ms lease.
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]))
                .with_ttl(Duration::from_millis(300))
                .with_concurrency(1)
                .with_delete_source(true);
            let report = migrate(&*source, &slow, &options, &())
                .await
                .expect("migrate");
            assert_eq!(report.documents, docs.len() as u64);
            assert_same(&*target, &id, &docs).await;
            no_locks_left(&*source, &id).await;
            no_locks_left(&*target, &id).await;
        },
    );
}

#[test]
fn verifying_a_run_neither_store_has_is_not_found() {
    with_places(
        "verify_missing",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let missing = Selection::Runs(vec![run("Nowhere")]);
            let error = verify(&*source, &*target, &missing, &())
                .await
                .expect_err("missing");
            assert_eq!(error.kind(), ErrorKind::NotFound);
        },
    );
}

// ------------------------------------------------------- issue 16

/// Forwards everything, the batches included, to a store, counting the
/// calls and the bytes inside `put_many` calls at once; `put_many` can be
/// made slow.
struct Counting {
    inner: Arc<dyn Lock>,
    gets: AtomicU64,
    heads: AtomicU64,
    /// Documents read, one at a time or in batches.
    docs_read: AtomicU64,
    puts: AtomicU64,
    get_manys: AtomicU64,
    put_manys: AtomicU64,
    slow_batches: Option<Duration>,
    writing: AtomicU64,
    most_writing: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn Lock>) -> Self {
        Counting {
            inner,
            gets: AtomicU64::new(0),
            heads: AtomicU64::new(0),
            docs_read: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            get_manys: AtomicU64::new(0),
            put_manys: AtomicU64::new(0),
            slow_batches: None,
            writing: AtomicU64::new(0),
            most_writing: AtomicU64::new(0),
        }
    }

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

impl fmt::Debug for Counting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counting")
            .field("inner", &self.inner)
            .finish()
    }
}

#[async_trait]
impl Store for Counting {
    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }
    async fn get(
        &self,
        run: &RunId,
        doc: &DocName,
        options: GetOptions,
    ) -> Result<Option<StoredDoc>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.docs_read.fetch_add(1, Ordering::SeqCst);
        self.inner.get(run, doc, options).await
    }
    async fn head(&self, run: &RunId, doc: &DocName) -> Result<Option<DocStat>> {
        self.heads.fetch_add(1, Ordering::SeqCst);
        self.inner.head(run, doc).await
    }
    async fn put(
        &self,
        run: &RunId,
        doc: &DocName,
        bytes: Bytes,
        options: PutOptions<'_>,
    ) -> Result<Version> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put(run, doc, bytes, options).await
    }
    async fn get_many(
        &self,
        run: &RunId,
        docs: &[DocName],
        options: GetOptions,
    ) -> Result<Vec<Result<Option<StoredDoc>>>> {
        self.get_manys.fetch_add(1, Ordering::SeqCst);
        self.docs_read
            .fetch_add(docs.len() as u64, Ordering::SeqCst);
        self.inner.get_many(run, docs, options).await
    }
    async fn put_many(&self, run: &RunId, puts: Vec<PutRequest>) -> Result<Vec<Result<Version>>> {
        self.put_manys.fetch_add(1, Ordering::SeqCst);
        let bytes: u64 = puts.iter().map(|p| p.bytes.len() as u64).sum();
        let now = self.writing.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.most_writing.fetch_max(now, Ordering::SeqCst);
        if let Some(delay) = self.slow_batches {
            tokio::time::sleep(delay).await;
        }
        let outcome = self.inner.put_many(run, puts).await;
        self.writing.fetch_sub(bytes, Ordering::SeqCst);
        outcome
    }
    async fn delete(
        &self,
        run: &RunId,
        doc: &DocName,
        if_version: Option<&Version>,
    ) -> Result<bool> {
        self.inner.delete(run, doc, if_version).await
    }
    async fn list_docs(
        &self,
        run: &RunId,
        after: Option<&DocName>,
        limit: usize,
    ) -> Result<ListPage<DocMeta>> {
        self.inner.list_docs(run, after, limit).await
    }
    async fn list_runs(&self, after: Option<&RunId>, limit: usize) -> Result<ListPage<RunId>> {
        self.inner.list_runs(after, limit).await
    }
    async fn delete_run(&self, run: &RunId) -> Result<u64> {
        self.inner.delete_run(run).await
    }
    async fn milestones(&self, run: &RunId) -> Result<Milestones> {
        self.inner.milestones(run).await
    }
    async fn mark(&self, run: &RunId, task: &str, at: std::time::SystemTime) -> Result<()> {
        self.inner.mark(run, task, at).await
    }
    async fn set_attr(&self, run: &RunId, name: &str, value: &str) -> Result<()> {
        self.inner.set_attr(run, name, value).await
    }
}

#[async_trait]
impl Lock for Counting {
    async fn try_acquire(&self, key: &LockKey, owner: &Owner, ttl: Duration) -> Result<Lease> {
        self.inner.try_acquire(key, owner, ttl).await
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.inner.renew(lease, ttl).await
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.inner.release(lease).await
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }
    async fn break_lock(
        &self,
        key: &LockKey,
        only_fence: Option<Fence>,
    ) -> Result<Option<LockInfo>> {
        self.inner.break_lock(key, only_fence).await
    }
    async fn list_locks(&self, run: Option<&RunId>) -> Result<Vec<LockInfo>> {
        self.inner.list_locks(run).await
    }
}

/// `n` documents of `size` bytes, each different.
fn many(n: usize, size: usize) -> Vec<(DocName, Bytes)> {
    (0..n)
        .map(|i| {
            let mut rng = fastrand::Rng::with_seed(i as u64);
            (
                doc(&format!("doc{i:04}")),
                Bytes::from((0..size).map(|_| rng.u8(..)).collect::<Vec<u8>>()),
            )
        })
        .collect()
}

/// Documents travel in batches: read with `get_many`, written with
/// `put_many` (each on its own condition), read back with `get_many`;
/// never one `get` or `put` per document. (Before, 100 documents were 100
/// reads, 100 writes and 100 reads back.)
#[test]
fn documents_travel_in_batches() {
    with_places(
        "batches",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Batched");
            let docs = many(100, 100);
            seed(&*source, &id, &docs).await;
            let from = Counting::new(Arc::clone(source.lock()));
            let to = Counting::new(Arc::clone(target.lock()));
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let report = migrate(&from, &to, &options, &()).await.expect("migrate");
            assert_eq!(report.documents, 100);
            assert_same(&*target, &id, &docs).await;
            assert_eq!(Counting::count(&from.gets), 0, "no single reads");
            assert_eq!(Counting::count(&to.gets), 0, "no single reads back");
            assert_eq!(Counting::count(&to.puts), 0, "no single writes");
            // 64 documents in flight, 8 batches at a time: 8 to a batch.
            let batches = Counting::count(&to.put_manys);
            assert!((13..=16).contains(&batches), "{batches} batches");
            assert_eq!(Counting::count(&from.get_manys), batches);
            assert_eq!(
                Counting::count(&to.get_manys),
                batches,
                "every batch read back"
            );

            // Resuming compares what is there in batches too.
            let again = migrate(&from, &to, &options, &()).await.expect("again");
            assert_eq!((again.documents, again.identical), (0, 100));
            assert_eq!(Counting::count(&from.gets) + Counting::count(&to.gets), 0);
        },
    );
}

/// No more documents of a run are in flight than `concurrency`, also when
/// it is not a multiple of the eight lanes. (Before, 9 made eight batches
/// of 2: 16 documents written at once.)
#[test]
fn no_more_documents_than_the_concurrency_are_in_flight() {
    with_places(
        "concurrency",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let id = run("Concurrency");
            let size = 1024;
            let docs = many(40, size);
            seed(&*source, &id, &docs).await;
            let mut to = Counting::new(Arc::clone(target.lock()));
            to.slow_batches = Some(Duration::from_millis(20));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_concurrency(9);
            let report = migrate(&*source, &to, &options, &())
                .await
                .expect("migrate");
            assert_eq!(report.documents, 40);
            let most = Counting::count(&to.most_writing) / size as u64;
            assert!(most <= 9, "{most} documents written at once");
            assert!(most >= 2, "batches ran at the same time: {most}");
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// The memory budget holds across every batch and every run in flight:
/// with 16 runs of 16 KiB documents copied 4 at a time under a 256 KiB
/// budget (each document counting twice), never more than 128 KiB of
/// documents are being written at once, while far more would fit in the
/// batches in flight without it.
#[test]
fn the_memory_budget_bounds_every_batch_in_flight() {
    with_places(
        "budget",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let ids: Vec<RunId> = (0..4).map(|i| run(&format!("budget-{i}"))).collect();
            let docs = many(32, 16 * 1024);
            for id in &ids {
                seed(&*source, id, &docs).await;
            }
            let mut to = Counting::new(Arc::clone(target.lock()));
            to.slow_batches = Some(Duration::from_millis(20));
            let options = MigrateOptions::new(Selection::Runs(ids.clone()))
                .with_jobs(4)
                .with_memory_budget(256 * 1024);
            let report = migrate(&*source, &to, &options, &())
                .await
                .expect("migrate");
            assert_eq!(report.documents, 4 * 32);
            let most = Counting::count(&to.most_writing);
            assert!(most <= 128 * 1024, "{most} bytes written at once");
            assert!(most >= 32 * 1024, "batches ran at the same time: {most}");
            for id in &ids {
                assert_same(&*target, id, &docs).await;
            }
        },
    );
}

/// Copies into S3 are verified by their ETags, the MD5 the server
/// computed of the bytes it stored, compared with the MD5 of the source
/// bytes: nothing is read back (here the target's reads would even return
/// altered bytes, unnoticed since they are never made). (Before, every
/// copy was read back, and this one failed as corrupt.)
#[test]
fn copies_into_s3_are_verified_by_their_md5() {
    with_places(
        "md5_verified",
        Backend::File,
        Backend::S3,
        |source, target| async move {
            let id = run("Md5_verified");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let mut lying_reads = Hooked::new(Arc::clone(target.lock()));
            lying_reads.corrupt_reads = true;
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let report = migrate(&*source, &lying_reads, &options, &())
                .await
                .expect("verified by the ETags");
            assert_eq!(report.verified_by_md5, docs.len() as u64);
            assert_eq!(report.verified, docs.len() as u64);
            assert_eq!(lying_reads.gets.load(Ordering::SeqCst), 0, "no read back");
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// A copy whose version does not prove its bytes is read back, even on
/// S3: object_store's in-memory store counts its ETags (as SSE-KMS or a
/// multipart upload would make them no MD5), so every copy is read back
/// and a copy that reads back different fails the run as corrupt.
#[test]
fn a_copy_whose_version_proves_nothing_is_read_back() {
    with_places(
        "md5_unproven",
        Backend::File,
        Backend::Sqlite,
        |source, _target| async move {
            use runstate::s3::object_store::memory::InMemory;
            use runstate::s3::{S3Config, S3Store};
            let id = run("Md5_unproven");
            let docs = small();
            seed(&*source, &id, &docs).await;
            let s3: Arc<dyn Lock> = Arc::new(
                S3Store::from_object_store(Arc::new(InMemory::new()), S3Config::new("memory"))
                    .await
                    .expect("an S3 store in memory"),
            );
            assert_eq!(s3.capabilities().backend, "s3");
            let options = MigrateOptions::new(Selection::Runs(vec![id.clone()]));
            let mut lying_reads = Hooked::new(Arc::clone(&s3));
            lying_reads.corrupt_reads = true;
            let error = migrate(&*source, &lying_reads, &options, &())
                .await
                .expect_err("read back and found different");
            assert_eq!(error.kind(), ErrorKind::Corrupt, "{error}");
            let report = migrate(&*source, &*s3, &options, &())
                .await
                .expect("read back and found identical");
            assert_eq!(report.verified_by_md5, 0);
            assert_same(&*s3, &id, &docs).await;
        },
    );
}

/// A move out of S3 (no conditional deletes) reads each source document
/// once: the copy's `GET`. Before deleting a document, the check that it is
/// still the version copied asks for its version only (one `HEAD`), never
/// its bytes again. (Before, each document was read twice: 2N `GET`s for N
/// documents.)
#[test]
fn a_move_out_of_s3_reads_each_document_once() {
    with_places(
        "move_reads_once",
        Backend::File,
        Backend::Sqlite,
        |_source, target| async move {
            use runstate::s3::object_store::memory::InMemory;
            use runstate::s3::{S3Config, S3Store};
            let s3: Arc<dyn Lock> = Arc::new(
                S3Store::from_object_store(Arc::new(InMemory::new()), S3Config::new("memory"))
                    .await
                    .expect("an S3 store in memory"),
            );
            assert!(!s3.capabilities().conditional_delete);
            let id = run("Move_reads_once");
            let docs = many(40, 1024);
            seed(&*s3, &id, &docs).await;
            let from = Counting::new(Arc::clone(&s3));
            let options =
                MigrateOptions::new(Selection::Runs(vec![id.clone()])).with_delete_source(true);
            let report = migrate(&from, &*target, &options, &()).await.expect("move");
            assert!(report.runs[0].source_deleted);
            assert_eq!(
                Counting::count(&from.docs_read),
                docs.len() as u64,
                "one read per document"
            );
            assert_eq!(Counting::count(&from.gets), 0, "no single reads");
            assert_eq!(Counting::count(&from.heads), docs.len() as u64);
            assert!(s3.list_all_docs(&id).await.expect("list").is_empty());
            assert_same(&*target, &id, &docs).await;
        },
    );
}

/// Records the runs started and not finished.
#[derive(Default)]
struct Overlap {
    active: AtomicU64,
    most: AtomicU64,
    failed: Mutex<Vec<(RunId, ErrorKind)>>,
}

impl Progress for Overlap {
    fn run_started(&self, _run: &RunId, _documents: usize, _bytes: u64) {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
    }
    fn run_finished(&self, _run: &RunId) {
        self.active.fetch_sub(1, Ordering::SeqCst);
    }
    fn run_failed(&self, run: &RunId, error: &runstate::Error) {
        self.failed
            .lock()
            .expect("not poisoned")
            .push((run.clone(), error.kind()));
    }
}

/// `jobs` runs are copied at the same time, and the report lists them in
/// the order selected.
#[test]
fn several_runs_are_copied_at_once() {
    with_places(
        "jobs",
        Backend::Sqlite,
        Backend::File,
        |source, target| async move {
            let ids: Vec<RunId> = (0..6).map(|i| run(&format!("job-{i}"))).collect();
            for id in &ids {
                seed(&*source, id, &small()[..2]).await;
            }
            let mut slow = Hooked::new(Arc::clone(target.lock()));
            slow.slow_puts = Some(Duration::from_millis(100));
            let options = MigrateOptions::new(Selection::Runs(ids.clone())).with_jobs(3);
            let overlap = Overlap::default();
            let report = migrate(&*source, &slow, &options, &overlap)
                .await
                .expect("migrate");
            assert_eq!(overlap.most.load(Ordering::SeqCst), 3, "three runs at once");
            assert_eq!(
                report
                    .runs
                    .iter()
                    .map(|r| r.run.clone())
                    .collect::<Vec<_>>(),
                ids.iter().cloned().map(Some).collect::<Vec<_>>()
            );
            assert_eq!(report.documents, 12);
            for id in &ids {
                assert_same(&*target, id, &small()[..2]).await;
                no_locks_left(&*source, id).await;
                no_locks_left(&*target, id).await;
            }
        },
    );
}

/// A failed run stops the migration, unless `keep_going`: then the others
/// are copied, and the report says which run failed and why.
#[test]
fn keep_going_reports_a_failed_run_and_copies_the_others() {
    with_places(
        "keep_going",
        Backend::File,
        Backend::Sqlite,
        |source, target| async move {
            let ids: Vec<RunId> = ["kg-a", "kg-b", "kg-c"].map(run).to_vec();
            for id in &ids {
                seed(&*source, id, &small()).await;
            }
            // Run b's target holds a document that differs: refused.
            write(&*target, &ids[1], "ron", b"{\"someone\": \"else\"}").await;
            let options = MigrateOptions::new(Selection::Runs(ids.clone()));

            let error = migrate(&*source, &*target, &options, &())
                .await
                .expect_err("stops at b");
            assert_eq!(
                (error.kind(), error.run()),
                (ErrorKind::AlreadyExists, Some(&ids[1]))
            );
            assert!(
                target
                    .list_all_docs(&ids[2])
                    .await
                    .expect("list")
                    .is_empty(),
                "c was not started"
            );

            for jobs in [1, 3] {
                let overlap = Overlap::default();
                let report = migrate(
                    &*source,
                    &*target,
                    &options.clone().with_keep_going(true).with_jobs(jobs),
                    &overlap,
                )
                .await
                .expect("keeps going");
                let copied: Vec<Option<RunId>> =
                    report.runs.iter().map(|r| r.run.clone()).collect();
                assert_eq!(copied, vec![Some(ids[0].clone()), Some(ids[2].clone())]);
                assert_eq!(report.failed.len(), 1, "jobs {jobs}");
                let failed = &report.failed[0];
                assert_eq!(
                    (&failed.run, failed.kind),
                    (&ids[1], ErrorKind::AlreadyExists)
                );
                assert!(failed.error.contains("differ"), "{}", failed.error);
                assert_eq!(
                    *overlap.failed.lock().expect("not poisoned"),
                    vec![(ids[1].clone(), ErrorKind::AlreadyExists)]
                );
                let json = serde_json::to_value(&report).expect("serializes");
                assert_eq!(json["failed"][0]["kind"], "already exists", "{json}");
            }
            assert_same(&*target, &ids[0], &small()).await;
            assert_same(&*target, &ids[2], &small()).await;
        },
    );
}
