//! Migrations through `runstate::open`: every ordered pair of backends
//! copies a run byte-exact, verifies, and re-runs to a no-op; then the
//! guarantees of the migration itself (refusal, overwrite, resume after an
//! interruption, delete-source only after verification, dry run, source
//! lease, detection of writers that do not lock) on the embedded backends.

mod support;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use runstate::migrate::{MigrateOptions, Progress, Selection, migrate, sha256_hex, verify};
use runstate::{
    AnyStore, Bytes, Capabilities, DocMeta, DocName, ErrorKind, Fence, GetOptions, Lease, ListPage,
    Lock, LockExt, LockInfo, LockKey, Owner, PutOptions, Result, RunId, Store, StoreExt, StoredDoc,
    Version, WaitPolicy, async_trait,
};
use support::{Backend, Places};

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
    runtime().block_on(async {
        let opened_source = runstate::open(&source.url).await.expect("open the source");
        let opened_target = runstate::open(&target.url).await.expect("open the target");
        let outcome = tokio::spawn(body(opened_source, opened_target)).await;
        source.cleanup().await;
        target.cleanup().await;
        if let Err(error) = outcome {
            std::panic::resume_unwind(error.into_panic());
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
}

#[async_trait]
impl Lock for Hooked {
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
