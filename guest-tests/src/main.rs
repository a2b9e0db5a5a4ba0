//! `guest-tests`: runs the Linux end-to-end virtio-mem scenarios against a VMM
//! (usually through `ci/guest-test`). See guest-tests/README.md.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::Parser;

use guest_tests::firecracker::Firecracker;
use guest_tests::host::{decide, Where};
use guest_tests::ours::{KernelForm, Ours};
use guest_tests::qemu::Qemu;
use guest_tests::runner::{self, Paths, RunOptions};
use guest_tests::scenarios::{self, Kernel, Scenario};
use guest_tests::vmm::Vmm;
use guest_tests::{autosize_bench, resize_bench, resize_soak, soak, timeline};

#[derive(Debug, Parser)]
#[command(about = "Linux end-to-end virtio-mem scenarios against a VMM")]
struct Args {
    /// VMM under test: qemu (reference virtio-mem-pci) or ours.
    #[arg(long, default_value = "qemu")]
    vmm: String,
    /// Guest kernel: 6.1, 6.12 or all.
    #[arg(long, default_value = "all")]
    kernel: String,
    /// Run only this scenario (repeatable); see --list.
    #[arg(long)]
    scenario: Vec<String>,
    /// Scenario set: all; ci (every scenario on 6.1, the marked ones on 6.12); ci-smp
    /// (probe, plug, data, unplug and reboot on both kernels, for a run with --cpus 2).
    #[arg(long, default_value = "all")]
    suite: String,
    /// Where to run the VMM: auto, direct (this host's KVM) or testhost (nested L1).
    #[arg(long = "where", env = "GUEST_TESTS_WHERE", default_value = "auto")]
    where_: String,
    /// Repository root (for ci/testhost-run and target/).
    #[arg(long, env = "GUEST_TESTS_ROOT")]
    root: Option<PathBuf>,
    /// Guest-test directory with images/ (default <root>/target/guest).
    #[arg(long, env = "GUEST_DIR")]
    guest_dir: Option<PathBuf>,
    /// Our VMM's binary (default <cargo target dir>/release/vmm: the build users run, and
    /// the one to hold beside QEMU's optimised binary).
    #[arg(long)]
    vmm_binary: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// QEMU accelerator for the guest: kvm, or tcg for a software-only reference run
    /// of the guest image (no test host needed; slower, not a KVM measurement).
    #[arg(long, default_value = "kvm")]
    qemu_accel: String,
    /// Memory of the nested test host.
    #[arg(long, default_value = "4G")]
    testhost_mem: String,
    /// Guest vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// KVM paravirtual features to hide from the guest, comma separated (our VMM's
    /// `--kvm-pv-off` names; QEMU gets the matching `-cpu host,kvm-...=off`).
    #[arg(long, env = "GUEST_TESTS_KVM_PV_OFF", value_delimiter = ',')]
    kvm_pv_off: Vec<String>,
    /// Print the guest console as it comes.
    #[arg(long)]
    echo: bool,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Instead of scenarios, boot this many guests one after another through the soak
    /// routine (ready, dmesg_all, report, plug 512 MiB, unplug, poweroff) and print a
    /// table of failure classes (one --kernel).
    #[arg(long)]
    soak: Option<usize>,
    /// Instead of scenarios, boot one guest and run this many resize cycles between random
    /// block-aligned sizes, with data written before and verified after each shrink (one
    /// --kernel; `ci/soak`).
    #[arg(long)]
    resize_cycles: Option<usize>,
    /// Seed of the resize soak's sizes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// MiB of checksummed data the resize soak writes before each shrink.
    #[arg(long, default_value_t = resize_soak::DEFAULT_DATA_MIB)]
    data_mib: u64,
    /// Instead of scenarios, replay the automatic sizing bench's workload trace against
    /// our VMM with --autosize, QEMU with a balloon and our VMM with a static size (one
    /// --kernel; `ci/autosize-bench`). Samples go to <guest dir>/autosize-bench/.
    #[arg(long)]
    autosize_bench: bool,
    /// Instead of scenarios, plug this many MiB and unplug them again (after writing and
    /// freeing --data-mib), printing each resize's steps on one clock (one --kernel;
    /// `ci/resize-timeline`).
    #[arg(long)]
    resize_timeline: Option<u64>,
    /// With --resize-timeline: plug with populate (ours --populate, QEMU prealloc=on).
    #[arg(long)]
    timeline_populate: bool,
    /// Instead of scenarios, run this many pairs of QEMU and ours: plug --bench-size-mib,
    /// write and free --data-mib, unplug; then a populated plug of --populate-mib (QEMU
    /// prealloc=on, ours --populate); print medians, JSON to <guest dir>/resize-bench/ (one
    /// --kernel; `ci/resize-bench`).
    #[arg(long)]
    resize_bench: Option<usize>,
    /// Plug size of the resize bench (MiB).
    #[arg(long, default_value_t = 1024)]
    bench_size_mib: u64,
    /// Populated plug size of the resize bench (MiB).
    #[arg(long, default_value_t = 2048)]
    populate_mib: u64,
    /// The form of the guest kernel our VMM boots: bzimage (the distribution's, as QEMU
    /// boots it) or elf (the vmlinux ci/guest-image extracts, as Firecracker boots it).
    #[arg(long, default_value = "bzimage")]
    ours_kernel: String,
    /// Another build of our VMM for the resize bench, as NAME=PATH[,elf] (repeatable): a
    /// column of its own, resize boots only (to tell what a change bought); `,elf` boots it
    /// with the ELF vmlinux.
    #[arg(long)]
    compare_binary: Vec<String>,
    /// A Firecracker binary (1.14 or later, built by the operator from its public
    /// sources) for the resize bench: a column of its own, resize boots only, booting the
    /// ELF vmlinux as Firecracker does.
    #[arg(long)]
    firecracker: Option<PathBuf>,
    /// Leave out the resize bench's free page reporting boots (a third of its time).
    #[arg(long)]
    no_fpr: bool,
    /// Leave out this scenario on this kernel, as NAME@KERNEL (repeatable).
    #[arg(long)]
    skip: Vec<String>,
}

fn select(args: &Args) -> Result<Vec<(Kernel, &'static Scenario)>, String> {
    let kernels =
        match args.kernel.as_str() {
            "all" => vec![Kernel::K61, Kernel::K612],
            k => vec![Kernel::parse(k)
                .ok_or_else(|| format!("unknown --kernel '{k}' (6.1, 6.12, all)"))?],
        };
    let suite: Option<fn(&Scenario) -> &'static [Kernel]> = match args.suite.as_str() {
        "all" => None,
        "ci" => Some(|s| s.ci),
        "ci-smp" => Some(|s| s.smp),
        s => return Err(format!("unknown --suite '{s}' (all, ci, ci-smp)")),
    };
    for n in &args.scenario {
        if scenarios::by_name(n).is_none() {
            let names: Vec<_> = scenarios::ALL.iter().map(|s| s.name).collect();
            return Err(format!(
                "unknown scenario '{n}'; known: {}",
                names.join(", ")
            ));
        }
    }
    let passed_before = runner::already_passed();
    let mut out = Vec::new();
    for k in kernels {
        for s in scenarios::ALL {
            if !args.scenario.is_empty() && !args.scenario.iter().any(|n| n == s.name) {
                continue;
            }
            if suite.is_some_and(|kernels_of| !kernels_of(s).contains(&k)) {
                continue;
            }
            if args.skip.contains(&runner::run_key(s.name, k.label())) {
                continue;
            }
            if passed_before.contains(&runner::run_key(s.name, k.label())) {
                println!(
                    "guest-tests: {} {} passed in an earlier test host of this run; not run again",
                    s.name,
                    k.label()
                );
                continue;
            }
            if let Some(why) = s.ours_only {
                if args.vmm != "ours" && !args.scenario.iter().any(|n| n == s.name) {
                    // Said by the run that executes the scenarios, not by its launcher.
                    let relaunch =
                        Where::parse(&args.where_).is_some_and(|w| decide(w).0 == Where::Testhost);
                    if !relaunch {
                        println!(
                            "guest-tests: NOT RUN {} {} against {}: {why} (name it with --scenario to run it anyway)",
                            s.name,
                            k.label(),
                            args.vmm
                        );
                    }
                    continue;
                }
            }
            out.push((k, s));
        }
    }
    if out.is_empty() && passed_before.is_empty() {
        return Err("no scenario selected".into());
    }
    Ok(out)
}

/// Runs this binary with the same arguments inside the nested test host, echoing its
/// output, and returns its status. `ci/testhost-run --retries 2` is the one place where
/// a failure of the test host itself (and only that) is retried, in a fresh L1; the
/// scenarios that passed before it are listed in `passed_file`, which the run inside reads
/// to leave them out.
fn run_in_testhost(
    root: &std::path::Path,
    guest_dir: &std::path::Path,
    exe: &std::path::Path,
    testhost_mem: &str,
    passed_file: &std::path::Path,
) -> std::io::Result<std::process::ExitStatus> {
    // A backstop only, for a run that keeps printing and never ends: L1's hangs are its
    // heartbeats' (30 s), a silent command is the idle timeout's, and every harness wait
    // has its own bound. It was 1500 s until a clean-clone CI run failed on it with every
    // scenario passing: that hour the machine ran 2.6 times slower (QEMU's suite 786 s
    // against 300), and our suite needs about 810 s on a normal hour. A long soak
    // (ci/soak) sets its own.
    let timeout = std::env::var("GUEST_TESTS_TESTHOST_TIMEOUT").unwrap_or_else(|_| "3600".into());
    let mut cmd = Command::new(root.join("ci/testhost-run"));
    cmd.args([
        "--mem",
        testhost_mem,
        "--retries",
        "2",
        "--timeout",
        &timeout,
        "--",
    ])
    .arg(exe)
    .args(std::env::args_os().skip(1));
    cmd.env("GUEST_TESTS_ROOT", root)
        .env("GUEST_DIR", guest_dir)
        .env(runner::PASSED_FILE_ENV, passed_file)
        .status()
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    if args.list {
        for s in scenarios::ALL {
            let ci: Vec<_> = s.ci.iter().map(|k| k.label()).collect();
            let smp: Vec<_> = s.smp.iter().map(|k| k.label()).collect();
            let only = if s.ours_only.is_some() {
                " (our VMM only)"
            } else {
                ""
            };
            println!(
                "{:<15} [ci: {:<8}] [ci-smp: {:<8}] {}{only}",
                s.name,
                ci.join(","),
                smp.join(","),
                s.about
            );
        }
        return ExitCode::SUCCESS;
    }
    if args.soak.is_some()
        || args.resize_cycles.is_some()
        || args.autosize_bench
        || args.resize_timeline.is_some()
        || args.resize_bench.is_some()
    {
        if args.kernel == "all" {
            eprintln!(
                "guest-tests: --soak, --resize-cycles, --autosize-bench, --resize-timeline and \
                 --resize-bench need one --kernel (6.1 or 6.12)"
            );
            return ExitCode::from(2);
        }
        if args.scenario.is_empty() {
            // The soak boots the probe scenario's configuration (online_movable).
            let mut a = args;
            a.scenario = vec!["probe".into()];
            return main_with(a);
        }
    }
    main_with(args)
}

fn main_with(args: Args) -> ExitCode {
    let selected = match select(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("guest-tests: {e}");
            return ExitCode::from(2);
        }
    };
    if selected.is_empty() {
        println!("guest-tests: every selected scenario passed in an earlier test host of this run");
        return ExitCode::SUCCESS;
    }
    let Some(want) = Where::parse(&args.where_) else {
        eprintln!(
            "guest-tests: unknown --where '{}' (auto, direct, testhost)",
            args.where_
        );
        return ExitCode::from(2);
    };
    let root = args
        .root
        .clone()
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")));
    let guest_dir = args
        .guest_dir
        .clone()
        .unwrap_or_else(|| root.join("target/guest"));
    let (mode, mut why) = decide(want);
    if mode == Where::Direct && args.vmm == "qemu" && args.qemu_accel == "tcg" {
        why = "directly under QEMU software emulation (tcg reference run, no KVM)".into();
    }
    println!("guest-tests: running {why}");

    if mode == Where::Testhost {
        // Re-run this very command inside the nested test host.
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(e) => {
                eprintln!("guest-tests: cannot find my own binary: {e}");
                return ExitCode::from(2);
            }
        };
        let passed_file = guest_dir
            .join("testhost-run")
            .join(format!("passed-{}", std::process::id()));
        let _ = std::fs::create_dir_all(guest_dir.join("testhost-run"));
        let _ = std::fs::remove_file(&passed_file);
        let status = run_in_testhost(&root, &guest_dir, &exe, &args.testhost_mem, &passed_file);
        let _ = std::fs::remove_file(&passed_file);
        return match status {
            Ok(s) => match s.code() {
                Some(0) => ExitCode::SUCCESS,
                Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
                None => ExitCode::FAILURE,
            },
            Err(e) => {
                eprintln!("guest-tests: cannot run ci/testhost-run: {e}");
                ExitCode::from(2)
            }
        };
    }

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let Some(ours_kernel) = KernelForm::parse(&args.ours_kernel) else {
        eprintln!(
            "guest-tests: unknown --ours-kernel '{}' (bzimage, elf)",
            args.ours_kernel
        );
        return ExitCode::from(2);
    };
    let ours = Ours {
        binary: args
            .vmm_binary
            .clone()
            .unwrap_or_else(|| target.join("release/vmm")),
        kernel: ours_kernel,
    };
    let qemu = Qemu {
        binary: args.qemu.clone(),
        accel: args.qemu_accel.clone(),
    };
    let vmm: Box<dyn Vmm> = match args.vmm.as_str() {
        "qemu" => Box::new(qemu.clone()),
        "ours" => Box::new(ours.clone()),
        v => {
            eprintln!("guest-tests: unknown --vmm '{v}' (qemu, ours)");
            return ExitCode::from(2);
        }
    };
    let work = std::env::temp_dir().join(format!("guest-tests-{}", std::process::id()));
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let paths = Paths {
        images: guest_dir.join("images"),
        logs: guest_dir
            .join("logs")
            .join(format!("{}-{run_id}", vmm.name())),
        work: work.clone(),
    };
    for d in [&paths.logs, &paths.work] {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("guest-tests: cannot create {}: {e}", d.display());
            return ExitCode::from(2);
        }
    }
    for (k, _) in &selected {
        let img = paths.images.join(k.image());
        if ["vmlinuz", "vmlinux", "initrd.img"]
            .iter()
            .any(|f| !img.join(f).exists())
        {
            eprintln!(
                "guest-tests: guest image {} missing: run ci/guest-image",
                img.display()
            );
            return ExitCode::from(2);
        }
    }
    println!(
        "guest-tests: VMM {}, {} scenario runs, console logs in {}",
        vmm.name(),
        selected.len(),
        paths.logs.display()
    );
    let opts = RunOptions {
        echo: args.echo,
        cpus: args.cpus,
        // An empty GUEST_TESTS_KVM_PV_OFF means none.
        kvm_pv_off: args
            .kvm_pv_off
            .iter()
            .filter(|f| !f.trim().is_empty())
            .cloned()
            .collect(),
    };
    if args.autosize_bench {
        let Some(&(kernel, sc)) = selected.first() else {
            return ExitCode::from(2);
        };
        let base = runner::spec_for(kernel, sc.boot, &paths, &opts, 0);
        let out = guest_dir.join("autosize-bench");
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("guest-tests: cannot create {}: {e}", out.display());
            return ExitCode::from(2);
        }
        println!(
            "guest-tests: autosize bench, kernel {}, {} vCPUs, samples in {}",
            kernel.label(),
            opts.cpus,
            out.display()
        );
        let ok = autosize_bench::run_all(&ours, &qemu, &base, &paths.logs, &out, args.echo);
        return finish(&work, ok);
    }
    if let Some(pairs) = args.resize_bench {
        let Some(&(kernel, sc)) = selected.first() else {
            return ExitCode::from(2);
        };
        let base = runner::spec_for(kernel, sc.boot, &paths, &opts, 0);
        // The guest directory: the test host can write there.
        let out = guest_dir.join("resize-bench");
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("guest-tests: cannot create {}: {e}", out.display());
            return ExitCode::from(2);
        }
        let plan = resize_bench::Plan {
            pairs,
            size: args.bench_size_mib << 20,
            data_mib: args.data_mib,
            populate: args.populate_mib << 20,
            fpr: !args.no_fpr,
        };
        println!(
            "guest-tests: resize bench, {pairs} pairs, kernel {}, {} vCPUs, {} MiB boot RAM, \
             {} MiB blocks, anon backing, host THP {}, ours {}",
            kernel.label(),
            opts.cpus,
            base.boot_mem >> 20,
            base.block_size >> 20,
            runner::host_thp(),
            ours.binary.display()
        );
        let mut compared = Vec::new();
        for c in &args.compare_binary {
            let Some((name, path)) = c.split_once('=') else {
                eprintln!("guest-tests: --compare-binary takes NAME=PATH[,elf], not '{c}'");
                return ExitCode::from(2);
            };
            let (path, kernel) = match path.strip_suffix(",elf") {
                Some(p) => (p, KernelForm::Elf),
                None => (path, KernelForm::BzImage),
            };
            compared.push((
                name.to_string(),
                Ours {
                    binary: PathBuf::from(path),
                    kernel,
                },
            ));
        }
        let mut entries = vec![
            resize_bench::Entry {
                vmm: &qemu,
                name: "qemu",
                full: true,
            },
            resize_bench::Entry {
                vmm: &ours,
                name: "ours",
                full: true,
            },
        ];
        entries.extend(compared.iter().map(|(name, o)| resize_bench::Entry {
            vmm: o,
            name,
            full: false,
        }));
        let firecracker = args
            .firecracker
            .clone()
            .map(|binary| Firecracker { binary });
        if let Some(fc) = &firecracker {
            entries.push(resize_bench::Entry {
                vmm: fc,
                name: "firecracker",
                full: false,
            });
        }
        let json = out.join(format!("resize-bench-{}.json", kernel.label()));
        let ok = resize_bench::run_all(&entries, &base, &paths.logs, &json, &plan, args.echo);
        return finish(&work, ok);
    }
    if let Some(mib) = args.resize_timeline {
        let Some(&(kernel, sc)) = selected.first() else {
            return ExitCode::from(2);
        };
        let mut spec = runner::spec_for(kernel, sc.boot, &paths, &opts, 0);
        spec.populate = args.timeline_populate;
        println!(
            "guest-tests: resize timeline, {mib} MiB{}, {} MiB of data before the unplug, \
             kernel {}, {} vCPUs, VMM {}, host THP {}",
            if spec.populate { " populated" } else { "" },
            args.data_mib,
            kernel.label(),
            opts.cpus,
            vmm.name(),
            runner::host_thp()
        );
        let result = timeline::run(
            vmm.as_ref(),
            &spec,
            &paths.logs,
            mib * (1 << 20),
            args.data_mib,
            args.echo,
        );
        let _ = std::fs::remove_dir_all(&work);
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("resize-timeline: FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(cycles) = args.resize_cycles {
        let Some(&(kernel, sc)) = selected.first() else {
            return ExitCode::from(2);
        };
        let spec = runner::spec_for(kernel, sc.boot, &paths, &opts, 0);
        println!(
            "guest-tests: resize soak of {cycles} cycles (seed {}, {} MiB of data per shrink), \
             {} vCPUs, kernel {}, VMM {}",
            args.seed,
            args.data_mib,
            opts.cpus,
            kernel.label(),
            vmm.name()
        );
        let result = resize_soak::run(
            vmm.as_ref(),
            &spec,
            &paths.logs,
            cycles,
            args.seed,
            args.data_mib,
            args.echo,
        );
        let _ = std::fs::remove_dir_all(&work);
        return match result {
            Ok(o) => {
                if let Some(f) = &o.first_failure {
                    println!("soak: first failure: {f}");
                }
                println!("{}", o.line());
                if o.failed == 0 && o.cycles == cycles {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                println!("soak: the guest could not be soaked: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(boots) = args.soak {
        let Some(&(kernel, sc)) = selected.first() else {
            return ExitCode::from(2);
        };
        let spec = runner::spec_for(kernel, sc.boot, &paths, &opts, 0);
        println!(
            "guest-tests: soak of {boots} boots, {} vCPUs, kernel {}, VMM {}",
            opts.cpus,
            kernel.label(),
            vmm.name()
        );
        let boots = soak::run(vmm.as_ref(), &spec, &paths.logs, boots, args.echo);
        print!("{}", soak::summary(&boots));
        return finish(&work, boots.iter().all(|b| b.failure.is_none()));
    }
    let t = Instant::now();
    let results = runner::run(vmm.as_ref(), &selected, &paths, &opts);
    let total = t.elapsed().as_secs_f64();
    runner::print_summary(&results, total, &why);
    let versions = runner::package_versions(&guest_dir);
    for v in &versions {
        println!("guest-tests: package {v}");
    }
    match runner::write_json(
        &guest_dir.join("results"),
        vmm.name(),
        &why,
        total,
        &results,
        &versions,
    ) {
        Ok(p) => println!("guest-tests: results in {}", p.display()),
        Err(e) => eprintln!("guest-tests: cannot write results: {e}"),
    }
    finish(&work, results.iter().all(|r| r.passed))
}

/// Removes the run's work directory and gives the exit status of a run that `ok` says
/// passed or not.
fn finish(work: &std::path::Path, ok: bool) -> ExitCode {
    let _ = std::fs::remove_dir_all(work);
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
