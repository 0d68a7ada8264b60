//! The benchmark suite of cocalc-project-host, run inside the testbed machine against the
//! installed package by `scripts/bench` (which builds, boots, installs, profiles and writes
//! docs/benchmarks.md). Every figure is printed next to a baseline measured in the same run on
//! the same machine; nothing asserts an absolute time.
//!
//!   suite run [OUT_DIR]      (inside the machine, as root; OUT_DIR default /xchg/bench)
//!
//! Sizes come from the environment: BENCH_N (30), BENCH_WARMUP (2), BENCH_BURST (50),
//! BENCH_BURST_REPS (3), BENCH_DENSITY (200), BENCH_CONNS (64), BENCH_LOAD_SECS (10),
//! BENCH_RESTARTS (3), BENCH_SNAP_BIG_MB (1024), BENCH_SSH_MB (1024),
//! BENCH_NGINX (/xchg/nginx/usr/sbin/nginx); BENCH_PROXY_BIG_MB (1024);
//! BENCH_PHASES=cold,latency,burst,density,snapshot,ssh,proxy runs only those (default: all; aliases:
//! start = latency, throughput = density, snapshots = snapshot); an unknown name is an error.
//! One file per phase in phases/ (the table `phases::PHASES`).
#![allow(clippy::unwrap_used)] // a bench tool: a panic is the report
mod http;
mod phases;
mod stats;

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `suite load ADDR PATH CONNS WARM_MS SECS [PID,…]`: one load run, its figures as JSON on
    // stdout, with the CPU time of the listed processes (the proxy phase runs it inside a
    // project's network namespace under nsenter)
    if args.first().map(String::as_str) == Some("load") && (6..=7).contains(&args.len()) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let num = |i: usize| args[i].parse::<u64>().unwrap();
        let target = http::Target::Tcp(args[1].parse().unwrap());
        let watch: Vec<u32> = args
            .get(6)
            .map(|p| p.split(',').filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default();
        let l = rt.block_on(http::load_watching(
            &target,
            &args[2],
            num(3) as usize,
            std::time::Duration::from_millis(num(4)),
            std::time::Duration::from_secs(num(5)),
            &watch,
        ));
        match l {
            Ok(l) => println!("{}", serde_json::to_string(&l).unwrap()),
            Err(e) => {
                eprintln!("load: {e:#}");
                std::process::exit(1);
            }
        }
        return;
    }
    if args.first().map(String::as_str) != Some("run") {
        // `cargo bench` lands here: the suite needs the testbed machine
        println!(
            "cocalc-project-host benchmark suite: run `scripts/bench` (root); it runs this binary \
             inside the testbed as `suite run [OUT_DIR]`."
        );
        return;
    }
    let out = PathBuf::from(args.get(1).map_or("/xchg/bench", String::as_str));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Err(e) = rt.block_on(phases::run(out)) {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}
