//! `weir demo` (being written).
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {}
pub async fn run(_: DemoOptions) -> anyhow::Result<()> {
    anyhow::bail!("demo not built yet")
}
