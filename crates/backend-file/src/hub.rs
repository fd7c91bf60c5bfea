//! One inotify instance per store, shared by every watch, status
//! subscription and lock waiter of that store.
//!
//! The kernel limits inotify instances per user (128 by default), not
//! watches, so a store opens one instance (through the `notify` crate, on
//! a thread of its own) the first time something is watched, and
//! multiplexes it: each *route* names a watched path and what it wants to
//! hear, and gets a [`Pending`] batch that the event thread fills and a
//! listener empties:
//!
//! - a **folder route** (a run folder for `watch`, a bookkeeping folder
//!   for status messages) collects the names of the entries that changed,
//!   coalesced (a set, so a burst of writes to one file is one name), and
//!   whether the folder itself went away;
//! - a **writes route** (a lease record, for lock waiters) is poked when the
//!   file's content is written (`IN_MODIFY`), which a release, an acquire,
//!   a renewal and a claim do and a mere open does not.
//!
//! When the kernel's queue overflowed (the `notify` crate's rescan flag) or
//! the instance reported an error, every route is told to rescan: its
//! consumer gets a `Resync`. Paths are the real paths of opened folders, so
//! one folder reached through a symlinked run folder is one watch.
//!
//! Lock order: the event thread takes only the routes table. Adding and
//! removing the kernel's watches (which waits for the event thread) takes
//! the control lock and never the routes table, so the two cannot wait on
//! each other.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use runstate_core::{Error, ErrorKind};

use crate::BACKEND;

/// What a route wants to hear.
#[derive(Clone, Copy)]
pub(crate) enum Want {
    /// Entries of a folder whose name passes the filter, and the folder's
    /// own removal.
    Children(fn(&str) -> bool),
    /// Writes to a file's content.
    Writes,
}

/// What happened on a route since its listener last looked.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Entries of a watched folder that changed (created, written,
    /// renamed, removed).
    pub(crate) names: BTreeSet<String>,
    /// Events may have been lost: re-read everything.
    pub(crate) rescan: bool,
    /// The watched folder was removed or renamed: its watch is gone.
    pub(crate) gone: bool,
    /// A watched file was written.
    pub(crate) written: bool,
}

/// The batch of a route, filled by the event thread.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    batch: Mutex<Batch>,
    ready: tokio::sync::Notify,
}

impl Pending {
    fn update(&self, change: impl FnOnce(&mut Batch)) {
        change(&mut self.batch.lock().unwrap_or_else(PoisonError::into_inner));
        // Stores a permit when nobody waits yet: never lost.
        self.ready.notify_one();
    }

    /// Waits until something was added since the last [`take`](Self::take)
    /// (or returns at once if it was).
    pub(crate) async fn changed(&self) {
        self.ready.notified().await;
    }

    /// Takes what happened so far.
    pub(crate) fn take(&self) -> Batch {
        std::mem::take(&mut *self.batch.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

struct Route {
    id: u64,
    want: Want,
    pending: Arc<Pending>,
}

#[derive(Default)]
struct Routes {
    next: u64,
    by_path: HashMap<PathBuf, Vec<Route>>,
}

struct Control {
    watcher: notify::INotifyWatcher,
    /// How many routes use each kernel watch.
    counts: HashMap<PathBuf, usize>,
}

/// A store's inotify instance and its routes.
pub(crate) struct Hub {
    routes: Arc<Mutex<Routes>>,
    control: Mutex<Control>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hub")
    }
}

/// Whether an event says nothing about content or names: opening a file or
/// closing one that was only read (every read of the store makes these).
fn is_noise(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Open(_) | AccessKind::Close(AccessMode::Read))
    )
}

impl Routes {
    fn all(&self) -> impl Iterator<Item = &Route> {
        self.by_path.values().flatten()
    }

    fn dispatch(&self, event: &Event) {
        if event.need_rescan() {
            for route in self.all() {
                route.pending.update(|b| b.rescan = true);
            }
            return;
        }
        if is_noise(&event.kind) {
            return;
        }
        for path in &event.paths {
            // The watched file or folder itself.
            for route in self.by_path.get(path).into_iter().flatten() {
                match route.want {
                    Want::Writes => {
                        if matches!(
                            event.kind,
                            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any)
                        ) {
                            route.pending.update(|b| b.written = true);
                        }
                    }
                    Want::Children(_) => {
                        if matches!(
                            event.kind,
                            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                        ) {
                            route.pending.update(|b| b.gone = true);
                        }
                    }
                }
            }
            // An entry of a watched folder.
            let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
                continue;
            };
            let Some(name) = name.to_str() else {
                continue;
            };
            for route in self.by_path.get(parent).into_iter().flatten() {
                if let Want::Children(accept) = route.want
                    && accept(name)
                {
                    route.pending.update(|b| {
                        b.names.insert(name.to_owned());
                    });
                }
            }
        }
    }
}

/// Keeps a route registered; dropping it removes the route, and the
/// kernel's watch once no route uses it.
pub(crate) struct RouteGuard {
    hub: Arc<Hub>,
    path: PathBuf,
    id: u64,
}

impl std::fmt::Debug for RouteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteGuard")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Drop for RouteGuard {
    fn drop(&mut self) {
        {
            let mut routes = self
                .hub
                .routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(list) = routes.by_path.get_mut(&self.path) {
                list.retain(|r| r.id != self.id);
                if list.is_empty() {
                    routes.by_path.remove(&self.path);
                }
            }
        }
        let (hub, path) = (Arc::clone(&self.hub), std::mem::take(&mut self.path));
        // Removing the kernel's watch waits for the event thread: never on
        // an async worker.
        let unwatch = move || hub.unwatch(&path);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(unwatch)),
            Err(_) => unwatch(),
        }
    }
}

/// A test hook that holds the event thread, so the kernel's queue can be
/// made to overflow.
pub(crate) type Pause = Arc<AtomicBool>;

impl Hub {
    /// Opens an inotify instance and its event thread. `pause` (set by a
    /// fault-injection test) holds the event thread while set.
    pub(crate) fn new(pause: Pause) -> Result<Arc<Hub>, Error> {
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let table = Arc::clone(&routes);
        let handler = move |event: notify::Result<Event>| {
            while pause.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let routes = table.lock().unwrap_or_else(PoisonError::into_inner);
            match event {
                Ok(event) => routes.dispatch(&event),
                Err(error) => {
                    // An error reading the queue: events may be lost.
                    tracing::debug!(%error, "inotify reported an error; every watch resyncs");
                    for route in routes.all() {
                        route.pending.update(|b| b.rescan = true);
                    }
                }
            }
        };
        let watcher = notify::INotifyWatcher::new(handler, notify::Config::default())
            .map_err(|e| notify_error("starting inotify", None, e))?;
        Ok(Arc::new(Hub {
            routes,
            control: Mutex::new(Control {
                watcher,
                counts: HashMap::new(),
            }),
        }))
    }

    /// Registers a route on `path` (the real path of a folder or file) and
    /// makes sure the kernel watches it. Blocking: waits for the event
    /// thread.
    ///
    /// # Errors
    /// `Backend` when the kernel refuses the watch (the path is gone, the
    /// watch limit is reached).
    pub(crate) fn add(
        self: &Arc<Self>,
        path: &Path,
        want: Want,
    ) -> Result<(RouteGuard, Arc<Pending>), Error> {
        let pending = Arc::new(Pending::default());
        let id = {
            let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
            routes.next += 1;
            let id = routes.next;
            routes
                .by_path
                .entry(path.to_owned())
                .or_default()
                .push(Route {
                    id,
                    want,
                    pending: Arc::clone(&pending),
                });
            id
        };
        let guard = RouteGuard {
            hub: Arc::clone(self),
            path: path.to_owned(),
            id,
        };
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        // Asked of the kernel every time, even when the path is watched
        // already: a folder removed and made again is a new inode, whose
        // watch this renews (adding a watch twice is harmless).
        match control.watcher.watch(path, RecursiveMode::NonRecursive) {
            Ok(()) => {
                *control.counts.entry(path.to_owned()).or_default() += 1;
                drop(control);
                Ok((guard, pending))
            }
            Err(error) => {
                drop(control);
                // Dropping the guard removes the route; its count was not
                // taken, so no watch is removed for it.
                let mut guard = guard;
                guard.forget_count();
                Err(notify_error("watching", Some(path), error))
            }
        }
    }

    fn unwatch(&self, path: &Path) {
        if path.as_os_str().is_empty() {
            return;
        }
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(count) = control.counts.get_mut(path) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            control.counts.remove(path);
            if let Err(error) = control.watcher.unwatch(path) {
                // Gone with its folder already.
                tracing::debug!(%error, path = %path.display(), "removing an inotify watch");
            }
        }
    }
}

impl RouteGuard {
    /// Drops the route without touching the kernel's watch (for a route
    /// whose watch was never added).
    fn forget_count(&mut self) {
        let mut routes = self
            .hub
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = routes.by_path.get_mut(&self.path) {
            list.retain(|r| r.id != self.id);
            if list.is_empty() {
                routes.by_path.remove(&self.path);
            }
        }
        // An empty path makes the drop's unwatch a no-op.
        self.path = PathBuf::new();
    }
}

fn notify_error(what: &str, path: Option<&Path>, error: notify::Error) -> Error {
    let kind = match &error.kind {
        notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            ErrorKind::Denied
        }
        _ => ErrorKind::Backend,
    };
    let message = match path {
        Some(path) => format!("{what} {} with inotify failed", path.display()),
        None => format!("{what} failed"),
    };
    Error::new(kind, message)
        .with_backend(BACKEND)
        .with_source(error)
}
