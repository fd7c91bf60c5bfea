//! How a backend plugs into the suite, and how one case runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use runstate_core::{Client, DocName, Error, Lock, Owner, RunId, WaitPolicy, async_trait};

/// Names the backends whose server must be present; `all` for every one.
pub const REQUIRE_VAR: &str = "RUNSTATE_REQUIRE_BACKENDS";

/// How the suite opens a backend.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// The backend's name, as in `RUNSTATE_REQUIRE_BACKENDS`.
    const BACKEND: &'static str;
    /// The environment variable with the server's URL, for backends that
    /// need one.
    const URL_VAR: Option<&'static str>;
    /// Whether several processes can open the same namespace and share its
    /// data (false for in-memory stores, which the multi-process cases then
    /// skip, saying so).
    const CROSS_PROCESS: bool = true;

    /// Opens a store confined to `namespace` (a fresh random name per case;
    /// child processes of the multi-process case open the same namespace and
    /// must see the same data). `Ok(None)` when the server is not
    /// configured.
    async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error>;

    /// Removes everything the namespace holds.
    async fn cleanup(namespace: &str) -> Result<(), Error>;

    /// A command (and its arguments) that child process number `index` of
    /// the multi-process cases is started under, the test binary and its
    /// arguments appended; empty (the default) starts the test binary
    /// itself. A harness can make children look like other hosts this way
    /// (`unshare --uts --pid …`), so that no same-host shortcut applies
    /// between them. Children run in process groups of their own, and
    /// signals go to the whole group.
    fn child_wrapper(index: usize) -> Vec<String> {
        let _ = index;
        Vec::new()
    }

    /// Makes document `doc` of `run` impossible to write in `namespace`
    /// (the store must then fail any save of it with an error, as a full
    /// disk or a refusing server would), for the case that checks a failed
    /// save still releases its lease. Returns `false` when the backend
    /// cannot stage that; the case then checks the other failing saves
    /// only. The default cannot.
    async fn make_unwritable(namespace: &str, run: &RunId, doc: &DocName) -> Result<bool, Error> {
        let _ = (namespace, run, doc);
        Ok(false)
    }
}

type Unwritable =
    fn(String, RunId, DocName) -> Pin<Box<dyn Future<Output = Result<bool, Error>> + Send>>;
type Reopen =
    fn(String) -> Pin<Box<dyn Future<Output = Result<Option<Arc<dyn Lock>>, Error>> + Send>>;

/// Whether `RUNSTATE_REQUIRE_BACKENDS` names `backend` (or is `all`).
pub fn is_required(backend: &str) -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|list| {
        list.split([',', ' '])
            .map(str::trim)
            .any(|name| name == backend || name == "all")
    })
}

/// The URL of `backend`'s server from the environment variable `var`, for
/// tests outside the suite; `what` names the test for the message. When it
/// is not set: a panic if the backend is required ([`is_required`]), else
/// a loud SKIPPED line and `None`.
///
/// # Panics
/// When the variable is not set and the backend is required.
pub fn server_url(backend: &str, var: &str, what: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) => Some(url),
        Err(_) if is_required(backend) => panic!(
            "backend `{backend}` is required ({REQUIRE_VAR}) but {var} is not set: \
             start its server or run `cargo xtask test`"
        ),
        Err(_) => {
            eprintln!(
                "\n*** SKIPPED {what} on backend `{backend}`: {var} is not set \
                 (set it, or run `cargo xtask test`) ***\n"
            );
            None
        }
    }
}

/// What a case gets: the store, its namespace, and helpers.
#[derive(Clone)]
pub struct Ctx {
    /// The backend, confined to this case's namespace.
    pub store: Arc<dyn Lock>,
    /// This case's namespace.
    pub namespace: String,
    /// The case's name.
    pub case: &'static str,
    pub(crate) child_test: &'static str,
    pub(crate) backend: &'static str,
    pub(crate) unwritable: Unwritable,
    pub(crate) cross_process: bool,
    pub(crate) child_wrapper: fn(usize) -> Vec<String>,
    pub(crate) reopen: Reopen,
}

impl Ctx {
    /// A run id (panics on an invalid one: test input).
    pub fn run(&self, id: &str) -> RunId {
        RunId::new(id).expect("valid run id in a test")
    }

    /// A document name (panics on an invalid one: test input).
    pub fn doc(&self, name: &str) -> DocName {
        DocName::new(name).expect("valid document name in a test")
    }

    /// A new owner in this process.
    pub fn owner(&self) -> Owner {
        Owner::for_this_process()
    }

    /// A typed client with its own owner, a 30 s TTL and a 120 s wait.
    pub fn client(&self) -> Client {
        Client::new(Arc::clone(&self.store))
            .with_wait(WaitPolicy::with_timeout(Duration::from_secs(120)))
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Another handle on this case's namespace, opened as a separate
    /// client would open it (its own connections, its own cache): what
    /// writes "behind the back" of `store`.
    ///
    /// # Panics
    /// When it cannot be opened.
    pub async fn reopen(&self) -> Arc<dyn Lock> {
        (self.reopen)(self.namespace.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot reopen namespace {}: {e}", self.namespace))
            .expect("the backend is configured")
    }

    /// Whether other processes can share this namespace; when not, a
    /// multi-process case says so and returns.
    pub fn cross_process(&self) -> bool {
        if !self.cross_process {
            eprintln!(
                "note: case {} needs several processes sharing a store; `{}` lives in one process",
                self.case, self.backend
            );
        }
        self.cross_process
    }

    /// Makes `doc` of `run` unwritable in this namespace, if the harness
    /// can ([`Harness::make_unwritable`]).
    ///
    /// # Panics
    /// When staging fails.
    pub async fn make_unwritable(&self, run: &RunId, doc: &DocName) -> bool {
        (self.unwritable)(self.namespace.clone(), run.clone(), doc.clone())
            .await
            .unwrap_or_else(|e| panic!("cannot make {run}/{doc} unwritable: {e}"))
    }
}

/// Logs runstate's core at `DEBUG` and everything else at `WARN` through
/// the test harness's captured output (the Tokio workers a case runs on
/// inherit its capture), so a failing case shows why a lease was lost or an
/// update was tried again, with the time of each step, and a passing one
/// shows nothing. Installed once per test binary, at its first case,
/// unless the binary installed a global subscriber of its own before (one
/// it installs after fails to: such a binary installs its own first).
fn capture_logs() {
    use tracing_subscriber::layer::SubscriberExt;

    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::filter::Targets::new()
            .with_target("runstate_core", tracing::Level::DEBUG)
            .with_default(tracing::Level::WARN);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_test_writer()
            .finish()
            .with(filter);
        // Another subscriber already installed is left in place.
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs one case against `H` in a fresh namespace, then cleans up; a panic
/// in the case fails the test after the cleanup.
///
/// # Panics
/// When the case fails, when the store cannot be opened, or when the
/// backend is required and not configured.
pub fn run_case<H: Harness>(
    case: &'static str,
    child_test: &'static str,
    body: fn(Ctx) -> CaseFuture,
) {
    capture_logs();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    runtime.block_on(async move {
        let namespace = format!("rs{:012x}", fastrand::u64(..) >> 16);
        let store = match H::open(&namespace).await {
            Ok(Some(store)) => store,
            Ok(None) => {
                let var = H::URL_VAR.unwrap_or("its URL");
                if is_required(H::BACKEND) {
                    panic!(
                        "backend `{}` is required ({REQUIRE_VAR}) but {var} is not set: \
                         start its server or run `cargo xtask test`",
                        H::BACKEND
                    );
                }
                eprintln!(
                    "\n*** SKIPPED {case} on backend `{}`: {var} is not set \
                     (set it, or run `cargo xtask test`) ***\n",
                    H::BACKEND
                );
                return;
            }
            Err(error) => panic!(
                "cannot open backend `{}`: {}",
                H::BACKEND,
                runstate_core::display_chain(&error)
            ),
        };
        let ctx = Ctx {
            store,
            namespace: namespace.clone(),
            case,
            child_test,
            backend: H::BACKEND,
            unwritable: |namespace, run, doc| {
                Box::pin(async move { H::make_unwritable(&namespace, &run, &doc).await })
            },
            cross_process: H::CROSS_PROCESS,
            child_wrapper: H::child_wrapper,
            reopen: |namespace| Box::pin(async move { H::open(&namespace).await }),
        };
        let outcome = tokio::spawn(body(ctx)).await;
        if let Err(error) = H::cleanup(&namespace).await {
            eprintln!(
                "cleanup of namespace {namespace} on `{}` failed: {}",
                H::BACKEND,
                runstate_core::display_chain(&error)
            );
        }
        if let Err(join) = outcome {
            match join.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(join) => panic!("case {case} did not finish: {join}"),
            }
        }
    });
}
