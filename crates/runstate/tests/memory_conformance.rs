//! The conformance suite on the in-memory store (`memory://`), which needs
//! no server: every case but the multi-process ones, which an in-memory
//! store cannot share across processes (they say so and return).

mod memory {
    use std::sync::Arc;

    use runstate::memory::MemoryStore;
    use runstate::{Error, Lock, async_trait};
    use runstate_conformance::Harness;

    pub struct Memory;

    #[async_trait]
    impl Harness for Memory {
        const BACKEND: &'static str = "memory";
        const URL_VAR: Option<&'static str> = None;
        const CROSS_PROCESS: bool = false;

        async fn open(namespace: &str) -> Result<Option<Arc<dyn Lock>>, Error> {
            // Named, so the case's own reopenings (and `runstate::open`) share it.
            Ok(Some(Arc::new(MemoryStore::named(namespace))))
        }

        async fn cleanup(_namespace: &str) -> Result<(), Error> {
            // The store goes with its last handle.
            Ok(())
        }
    }

    runstate_conformance::suite!(Memory);
}
