// mimalloc: the proxy allocates and frees small buffers per request on every core; glibc's
// allocator showed up at ~9% of CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    weir::main()
}
