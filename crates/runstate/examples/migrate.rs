//! Moving runs between stores: a run written to one store is copied to
//! another byte for byte, verified by SHA-256, and the copy compared.
//!
//! ```sh
//! cargo run -p runstate --example migrate                              # files → SQLite in a temporary folder
//! cargo run -p runstate --example migrate -- file:///runs?ext=nodb postgres://…/db
//! ```

use runstate::migrate::{MigrateOptions, Selection, migrate, verify};
use runstate::{Bytes, DocName, RunId, StoreExt};

#[tokio::main]
async fn main() -> runstate::Result<()> {
    let temp =
        std::env::temp_dir().join(format!("runstate-example-migrate-{}", std::process::id()));
    let mut args = std::env::args().skip(1);
    let from = args
        .next()
        .unwrap_or_else(|| format!("file://{}", temp.join("files").display()));
    let to = args
        .next()
        .unwrap_or_else(|| format!("sqlite://{}", temp.join("runs.db").display()));
    std::fs::create_dir_all(&temp).ok();
    let source = runstate::open(&from).await?;
    let target = runstate::open(&to).await?;

    let run = RunId::new("Mica_flume1")?;
    if source.list_all_docs(&run).await?.is_empty() {
        for (name, text) in [
            ("ron", "{\"name\":\"Mica flume\"}"),
            ("climate", "{\"years\":30}"),
        ] {
            source
                .put_bytes(&run, &DocName::new(name)?, Bytes::from(text))
                .await?;
        }
    }

    let options = MigrateOptions::new(Selection::Runs(vec![run.clone()]));
    let report = migrate(&*source, &*target, &options, &()).await?;
    println!(
        "copied {} documents ({} bytes), {} verified",
        report.documents, report.bytes, report.verified
    );
    let compared = verify(&*source, &*target, &Selection::Runs(vec![run]), &()).await?;
    println!("identical: {}", compared.identical());
    assert!(compared.identical());
    let _ = std::fs::remove_dir_all(&temp);
    Ok(())
}
