//! Documents in one store, leases in another: files that several hosts
//! could share, locked through a lock service (here SQLite, so the example
//! runs anywhere; use Redis or PostgreSQL across hosts). The file store
//! fences every save against the fences the lock service grants.
//!
//! ```sh
//! cargo run -p runstate --example split
//! cargo run -p runstate --example split -- 'file:///shared/runs?ext=nodb&locks=redis%3A%2F%2Fcache%3A6379%2F0'
//! ```

use runstate::{Document, RunId};
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Climate {
    station: String,
    years: u32,
}

impl Document for Climate {
    const NAME: &'static str = "climate";
}

fn encode(url: &str) -> String {
    url::form_urlencoded::byte_serialize(url.as_bytes()).collect()
}

#[tokio::main]
async fn main() -> runstate::Result<()> {
    let temp = std::env::temp_dir().join(format!("runstate-example-split-{}", std::process::id()));
    std::fs::create_dir_all(&temp).ok();
    let url = std::env::args().nth(1).unwrap_or_else(|| {
        let locks = format!("sqlite://{}", temp.join("locks.db").display());
        format!(
            "file://{}?locks={}",
            temp.join("runs").display(),
            encode(&locks)
        )
    });
    let store = runstate::open(&url).await?;
    println!("store: {} ({})", store.url(), store.capabilities().backend);
    let run = store.client().run(RunId::new("Mica_flume1")?);
    run.update_or_default(|c: &mut Climate| {
        c.station = "ID106388".into();
        c.years += 30;
    })
    .await?;
    let climate: Climate = run.load().await?;
    println!("{} years at {}", climate.years, climate.station);
    let _ = std::fs::remove_dir_all(&temp);
    Ok(())
}
