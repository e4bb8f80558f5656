//! keel's hello world: `cargo run -p keel-runtime --example hello -- DIR`. Run it twice on the
//! same DIR: the cron job fires every second in each run, the one-shot once in total.
use keel_runtime::{AttemptContext, Failure, JobId, JobSpec, Runtime, ScheduleSpec};
use std::{sync::Arc, time::Duration};

async fn greet(ctx: AttemptContext) -> Result<String, Failure> {
    println!("{} {}: {}", keel_runtime::now(), ctx.job, ctx.payload);
    Ok(format!("said {}", ctx.payload))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: hello DIR")?;
    let fs = Arc::new(keel_store_fs::FsStore::open(dir)?);
    let runtime = Runtime::builder(fs).handler("greet", greet).start().await?;
    let (keel, tick) = (runtime.handle(), ScheduleSpec::cron("* * * * * *"));
    let soon = ScheduleSpec::once(keel.now().plus_ms(1_000));
    for (name, schedule, text) in [("tick", tick, "tick"), ("welcome", soon, "welcome!")] {
        let job = JobSpec::new(JobId::new(name)?, "greet", schedule).with_payload(text);
        println!("job {name}: {}", keel.ensure_job(job).await?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(runtime.shutdown(Duration::from_secs(5)).await?)
}
