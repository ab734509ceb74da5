//! Data-parallel training over c10d/Gloo on loopback, CPU: two processes train as one process on
//! their concatenated batches and leave the group cleanly; a dead rank stops the job instead of
//! hanging it; `medgen launch` runs a job end to end and a checkpoint resumes with another number
//! of processes. Also what of the CUDA paths a CPU can check: each rank's GPU, NCCL compiled in,
//! and the `--deterministic` flags.
mod common;

use common::run::{configs, data, ok, s};
use medgen::amp::Precision;
use medgen::checkpoint::StateDict;
use medgen::config;
use medgen::data::loader::{read_list, DataLoader, LoaderConfig};
use medgen::distributed;
use medgen::nets::DiffusionModelUNet;
use medgen::schedulers::{NoiseSchedule, SchedulerKind};
use medgen::train::diffusion::{diffusion_loss, diffusion_step};
use medgen::train::grad_scaler::GradScaler;
use medgen::train::optim::{Adam, AdamConfig};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const ROLE: &str = "MEDGEN_DIST_TEST_OUT";
const STEPS: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
}

/// `STEPS` LDM steps of a tiny UNet on this process's shard, with the trainer's step function
/// (which averages gradients over the group when there is one); returns the weights.
/// Per-sample draws (noise, timestep) are seeded by (step, row), so any split of a batch across
/// processes draws the same values for the same sample.
fn train_steps(dir: &Path, batch: usize, shard: Option<(usize, usize)>) -> Vec<(String, Tensor)> {
    tch::set_num_threads(1);
    let [_, ldm, _] = configs(dir, 1);
    tch::manual_seed(3);
    let vs = VarStore::new(Device::Cpu);
    let ucfg = config::unet_config(&ldm).unwrap();
    let unet = DiffusionModelUNet::new(&vs.root(), &ucfg, medgen::checkpoint::Generation::Monai).unwrap();
    let sched_cfg = config::scheduler_config(&ldm, SchedulerKind::Ddpm).unwrap();
    let schedule = NoiseSchedule::from_config(&sched_cfg).unwrap();
    let mut opt = Adam::from_var_store(AdamConfig::adamw(1e-3), &vs).unwrap();
    let mut scaler = GradScaler::for_precision(Precision::Fp32).unwrap();
    let cfg = LoaderConfig { batch_size: batch, shuffle: true, seed: 5, shard, ..Default::default() };
    let loader = DataLoader::new(read_list(&dir.join("train.tsv")).unwrap(), cfg).unwrap();
    for (step, b) in loader.epoch(0).into_iter().take(STEPS).enumerate() {
        let b = b.unwrap();
        let latent = b.t1w.repeat([1, 3, 1, 1]) * 2.0 - 1.0;
        let (mut noise, mut t) = (Vec::new(), Vec::new());
        for &row in &b.rows {
            tch::manual_seed((1000 * step + row) as i64);
            noise.push(Tensor::randn([3, 16, 16], (Kind::Float, Device::Cpu)));
            t.push(Tensor::randint(1000, [1], (Kind::Int64, Device::Cpu)));
        }
        let (noise, t) = (Tensor::stack(&noise, 0), Tensor::cat(&t, 0));
        let _loss = diffusion_step(&mut opt, &mut scaler, Precision::Fp32, Device::Cpu, || {
            diffusion_loss(&unet, None, &schedule, sched_cfg.prediction_type, &latent, &noise, &t, None)
        })
        .unwrap();
    }
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The worker side of the test below, run in a child process of this test binary.
fn worker(out: &Path) {
    let g = distributed::init_from_env(Device::Cpu, Duration::from_secs(60)).unwrap().expect("a 2-process job");
    let dir = out.join(format!("rank{}", g.rank()));
    std::fs::create_dir_all(&dir).unwrap();
    data(&dir, 16);
    let vars = train_steps(&dir, 2, Some((g.rank(), g.world_size())));
    Tensor::save_multi(&vars, out.join(format!("rank{}.pt", g.rank()))).unwrap();
    g.barrier().unwrap();
    g.leave().unwrap();
    assert!(distributed::group().is_none(), "the group outlived leave()");
    assert_eq!((distributed::rank(), distributed::world_size()), (0, 1));
}

#[test]
fn two_processes_train_as_one_process_on_the_concatenated_batch() {
    if let Ok(out) = std::env::var(ROLE) {
        return worker(Path::new(&out));
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "two_processes_train_as_one_process_on_the_concatenated_batch", "--nocapture"])
                .env(ROLE, out)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .env("OMP_NUM_THREADS", "1")
                // Buckets of ~10 KB: many of them, each all-reduced while the backward pass goes on.
                .env("MEDGEN_BUCKET_CAP_MB", "0.01")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (rank, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "a rank failed:\n{}\n{err}", String::from_utf8_lossy(&o.stdout));
        assert!(err.contains(&format!("rank {rank} of 2 left")), "rank {rank} did not shut its group down:\n{err}");
    }
    // One process, batches of 4 = the two ranks' batches of 2 together.
    let dir = out.join("single");
    std::fs::create_dir_all(&dir).unwrap();
    data(&dir, 16);
    let single = train_steps(&dir, 4, None);
    let ranks: Vec<Vec<(String, Tensor)>> =
        (0..2).map(|r| Tensor::load_multi(out.join(format!("rank{r}.pt"))).unwrap()).collect();
    assert_eq!(ranks[0].len(), single.len());
    let mut worst = 0f64;
    for (((name, a), (n1, b)), (n2, c)) in ranks[0].iter().zip(&ranks[1]).zip(&single) {
        assert!(name == n1 && name == n2, "{name} {n1} {n2}");
        assert!(a.equal(b), "{name}: the replicas differ");
        worst = worst.max(f64::try_from((a - c).abs().max()).unwrap());
    }
    // The step changed the weights (a test that cannot pass by training nothing).
    let mut fresh_diff = 0f64;
    tch::manual_seed(3);
    {
        let vs = VarStore::new(Device::Cpu);
        let [_, ldm, _] = configs(&dir, 1);
        let _u = DiffusionModelUNet::new(
            &vs.root(),
            &config::unet_config(&ldm).unwrap(),
            medgen::checkpoint::Generation::Monai,
        )
        .unwrap();
        let mut init: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        init.sort_by(|a, b| a.0.cmp(&b.0));
        for ((_, a), (_, b)) in init.iter().zip(&single) {
            fresh_diff = fresh_diff.max(f64::try_from((a - b).abs().max()).unwrap());
        }
    }
    println!("2 processes vs 1 on the concatenated batch, {STEPS} steps: max |diff| {worst:.3e}; weights moved up to {fresh_diff:.3e}");
    assert!(fresh_diff > 1e-4, "training did not change the weights");
    assert!(worst <= 1e-6, "2-process weights differ from 1-process ones by {worst:e}");
}

fn train_args<'a>(stage: &'a str, cfg: &'a Path, data: &'a Path, run: &'a Path) -> Vec<&'a str> {
    vec!["train", stage, "--config", s(cfg), "--data", s(data), "--run", s(run)]
}

fn rank_cmd(rank: usize, port: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_medgen"));
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn checkpoint_step(run: &Path) -> u64 {
    let sd = StateDict::load(&run.join("checkpoint.safetensors"), None).unwrap();
    let state: serde_json::Value = serde_json::from_str(&sd.metadata["medgen.train_state"]).unwrap();
    state["step"].as_u64().unwrap()
}

/// A 2-rank AutoencoderKL job on a tiny data set in `d` (run directory `d/run`), returned once
/// rank 0 has written its first checkpoint: (config, run directory, rank 0, rank 1).
fn two_ranks_until_checkpointed(d: &Path, timeout_s: &str) -> (PathBuf, PathBuf, Child, Child) {
    data(d, 32);
    let [aekl, _, _] = configs(d, 400);
    let run: PathBuf = d.join("run");
    let port = free_port().to_string();
    let mut args = train_args("aekl", &aekl, d, &run);
    args.extend(["--dist-timeout", timeout_s]);
    let mut r0 = rank_cmd(0, &port, &args).spawn().unwrap();
    let r1 = rank_cmd(1, &port, &args).spawn().unwrap();
    let ck = run.join("checkpoint.safetensors");
    let t0 = Instant::now();
    while !ck.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "no checkpoint after 2 minutes");
        assert!(r0.try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    (aekl, run, r0, r1)
}

#[test]
fn a_dead_rank_stops_the_job_and_the_checkpoint_resumes_with_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (aekl, run, mut r0, mut r1) = two_ranks_until_checkpointed(d, "20");
    std::thread::sleep(Duration::from_millis(500));
    r1.kill().unwrap();
    let _ = r1.wait();
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = r0.try_wait().unwrap() {
            break st;
        }
        assert!(killed.elapsed() < Duration::from_secs(40), "rank 0 still running 40 s after rank 1 died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    println!(
        "rank 0 exited {status} {:.1} s after rank 1 was killed; its last words: {}",
        killed.elapsed().as_secs_f64(),
        err.lines().last().unwrap_or("")
    );
    assert!(!status.success(), "rank 0 succeeded although its peer died");
    assert!(err.contains("error:"), "rank 0 gave no error: {err}");
    // The checkpoint rank 0 wrote resumes in a lone process.
    let step = checkpoint_step(&run);
    let target = (step + 2).to_string();
    let mut resume = train_args("aekl", &aekl, d, &run);
    resume.extend(["--resume", "--max-steps", &target]);
    let out = ok(common::run::medgen(&resume));
    assert!(
        out.contains("the checkpoint was written by 2 process(es), this job has 1") || out.contains("resuming"),
        "{out}"
    );
    assert_eq!(checkpoint_step(&run), step + 2);
}

#[test]
fn launch_runs_every_stage_with_two_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, ldm, cn] = configs(d, 2);
    let runs = d.join("runs");
    let launch = |extra: Vec<&str>| {
        let mut args = vec!["launch", "--nproc", "2", "--"];
        args.extend(extra);
        let out = ok(common::run::medgen(&args));
        // Every rank shut its group down (NCCL's watchdogs would otherwise abort the exit).
        for r in 0..2 {
            assert!(out.contains(&format!("rank {r} of 2 left")), "{out}");
        }
    };
    let aekl_run = runs.join("aekl");
    launch(train_args("aekl", &aekl, d, &aekl_run));
    let ae_w = aekl_run.join("final_model.safetensors");
    let ldm_run = runs.join("ldm");
    let mut a = train_args("ldm", &ldm, d, &ldm_run);
    a.extend(["--stage1-config", s(&aekl), "--stage1-weights", s(&ae_w)]);
    launch(a);
    let cn_run = runs.join("controlnet");
    let ldm_w = ldm_run.join("final_model.safetensors");
    let mut a = train_args("controlnet", &cn, d, &cn_run);
    a.extend([
        "--stage1-config",
        s(&aekl),
        "--stage1-weights",
        s(&ae_w),
        "--ldm-config",
        s(&ldm),
        "--ldm-weights",
        s(&ldm_w),
    ]);
    launch(a);
    // 10 training rows, 5 per process, batches of 4: 2 steps per epoch, 2 epochs; one log line per step (rank 0 only).
    for run in [&aekl_run, &ldm_run, &cn_run] {
        assert!(run.join("final_model.safetensors").exists());
        let log = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let train_lines = log.lines().filter(|l| l.contains("\"split\":\"train\"")).count();
        assert_eq!(train_lines, 4, "{}: {log}", run.display());
        assert_eq!(checkpoint_step(run), 4);
    }
}

#[test]
fn a_stuck_rank_makes_the_other_fail_within_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, mut r0, mut r1) = two_ranks_until_checkpointed(tmp.path(), "5");
    let ck = tmp.path().join("run").join("checkpoint.safetensors");
    // Frozen, not dead: its sockets stay open, so only the timeout can end rank 0's wait.
    unsafe { libc::kill(r1.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let status = loop {
        if let Some(st) = r0.try_wait().unwrap() {
            break st;
        }
        if stopped.elapsed() > Duration::from_secs(60) {
            let _ = r0.kill();
            let _ = r1.kill();
            panic!("rank 0 still waiting 60 s after rank 1 froze (timeout 5 s)");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let waited = stopped.elapsed().as_secs_f64();
    unsafe { libc::kill(r1.id() as i32, libc::SIGKILL) };
    let _ = r1.wait();
    let mut err = String::new();
    std::io::Read::read_to_string(r0.stderr.as_mut().unwrap(), &mut err).unwrap();
    println!("rank 0 exited {status} {waited:.1} s after rank 1 froze: {}", err.lines().last().unwrap_or(""));
    assert!(!status.success());
    assert!(StateDict::load(&ck, None).is_ok(), "the last checkpoint does not load");
}

#[test]
fn each_rank_gets_its_own_gpu_or_a_clear_error() {
    use distributed::rank_device;
    // torchrun: every GPU of the node visible, LOCAL_RANK picks one.
    assert_eq!(rank_device(Device::Cuda(0), 3, 4).unwrap(), Device::Cuda(3));
    assert_eq!(rank_device(Device::Cuda(0), 0, 8).unwrap(), Device::Cuda(0));
    // Slurm's one GPU per task (or CUDA_VISIBLE_DEVICES per rank): the task's own GPU is cuda:0.
    assert_eq!(rank_device(Device::Cuda(0), 5, 1).unwrap(), Device::Cuda(0));
    // The CPU stays the CPU.
    assert_eq!(rank_device(Device::Cpu, 7, 0).unwrap(), Device::Cpu);
    // More local ranks than GPUs: an error naming the count, not two ranks on one GPU.
    let e = rank_device(Device::Cuda(0), 2, 2).unwrap_err().to_string();
    assert!(e.contains("local rank 2") && e.contains("sees 2 CUDA devices"), "{e}");
    let e = rank_device(Device::Cuda(0), 0, 0).unwrap_err().to_string();
    assert!(e.contains("sees none"), "{e}");
}

/// build.rs compiles NCCL's process group whenever the libtorch it links has CUDA (the torch wheel
/// of `make setup` does); this binary is what it built.
#[test]
fn nccl_is_compiled_in_where_libtorch_has_cuda() {
    let lib = std::env::var("LIBTORCH").expect("LIBTORCH is set by .cargo/config.toml or the environment");
    let cuda = Path::new(&lib).join("lib/libtorch_cuda.so").exists();
    println!("libtorch at {lib}: CUDA {cuda}, NCCL compiled in {}", distributed::nccl_compiled());
    assert_eq!(distributed::nccl_compiled(), cuda);
}

const DETERMINISM_ROLE: &str = "MEDGEN_DETERMINISM_CHILD";

/// `--deterministic`'s flags, set and read back through libtorch (in a child process: they are
/// process-wide, and the other tests here train without them).
#[test]
fn deterministic_sets_cudnn_and_tf32_flags() {
    use medgen::device::{set_deterministic, Determinism};
    if std::env::var_os(DETERMINISM_ROLE).is_some() {
        let before = Determinism::current().unwrap();
        println!("before: {before:?}");
        // PyTorch's defaults: cuDNN may pick any algorithm and uses TF32.
        assert!(!before.cudnn_deterministic && before.cudnn_tf32 && !before.deterministic_algorithms, "{before:?}");
        set_deterministic().unwrap();
        let after = Determinism::current().unwrap();
        println!("after: {after:?}");
        assert_eq!(
            after,
            Determinism {
                cudnn_deterministic: true,
                cudnn_benchmark: false,
                cudnn_tf32: false,
                cublas_tf32: false,
                deterministic_algorithms: true,
                warn_only: true,
            }
        );
        assert_eq!(std::env::var("CUBLAS_WORKSPACE_CONFIG").unwrap(), ":4096:8");
        return;
    }
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "deterministic_sets_cudnn_and_tf32_flags", "--nocapture"])
        .env(DETERMINISM_ROLE, "1")
        .env_remove("CUBLAS_WORKSPACE_CONFIG")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("after: "), "the child did not run the check: {out}");
}

#[test]
fn deterministic_is_a_flag_of_train_sample_and_eval() {
    for args in [&["train", "--help"][..], &["sample", "t1w", "--help"], &["eval", "fid", "--help"]] {
        let out = ok(common::run::medgen(args));
        assert!(out.contains("--deterministic"), "{args:?}: {out}");
    }
}

/// A job of one process (what the GPU check runs with NCCL on one GPU): the group works, shuts
/// down, and its store's port is free again, so a second group can be the process-wide one.
#[test]
fn a_group_shuts_down_and_frees_its_store() {
    let env = distributed::DistEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        master_addr: "127.0.0.1".into(),
        master_port: free_port(),
    };
    for round in 0..2 {
        let g = distributed::ProcessGroup::new(&env, distributed::Backend::Gloo, Device::Cpu, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        let job = distributed::init(g).unwrap();
        let t = Tensor::from_slice(&[1.5f32, -2.0]);
        job.all_reduce_sum(std::slice::from_ref(&t)).unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.5, -2.0]);
        assert_eq!(distributed::sum_across(&[3.0]).unwrap(), [3.0]);
        job.barrier().unwrap();
        job.leave().unwrap();
        assert!(distributed::group().is_none());
    }
}

/// The CPU's kernels are deterministic already: `--deterministic` leaves a CPU run's weights as
/// they were, bit for bit.
#[test]
fn deterministic_leaves_cpu_training_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    data(d, 32);
    let [aekl, _, _] = configs(d, 1);
    let weights: Vec<Vec<(String, Tensor)>> = [false, true]
        .into_iter()
        .map(|det| {
            let run = d.join(format!("run-{det}"));
            let mut args = train_args("aekl", &aekl, d, &run);
            if det {
                args.push("--deterministic");
            }
            ok(common::run::medgen(&args));
            let mut w = Tensor::read_safetensors(run.join("final_model.safetensors")).unwrap();
            w.sort_by(|a, b| a.0.cmp(&b.0));
            w
        })
        .collect();
    assert_eq!(weights[0].len(), weights[1].len());
    for ((name, a), (n2, b)) in weights[0].iter().zip(&weights[1]) {
        assert_eq!(name, n2);
        assert!(a.equal(b), "{name}: --deterministic changed the CPU run's weights");
    }
}
