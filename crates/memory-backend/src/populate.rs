//! Populate on plug: fault a range in before the guest uses it, in parallel.
//!
//! Faulting memory in is CPU work (the kernel zeroes every page), so it scales with
//! threads until memory bandwidth runs out. The range is cut into chunks aligned to the
//! larger of the page size and 2 MiB (so no transparent or hugetlb page is split between
//! two threads), and the caller plus up to `threads - 1` helpers take chunks from a
//! shared counter until none is left or one fails. Helpers come from a process-wide pool
//! (one thread per core but one, started on first parallel populate and parked between
//! calls): a parked thread that is woken gets a core at once, while a freshly spawned one
//! can wait milliseconds for a busy core, a large share of a 1 GiB populate (~0.1 s);
//! with spawn-per-call threads the 2-core speedup at 1 GiB was 1.2-1.3x, with the pool
//! 1.7x. The caller withdraws unclaimed offers and waits for its helpers before it
//! returns, so no helper touches the range after `populate` returns.
//!
//! Each chunk is populated with `madvise(MADV_POPULATE_WRITE)` (Linux 5.14+), which
//! reports failures as errors instead of signals: an empty hugetlb pool, `ENOMEM` and
//! `EHWPOISON` come back as typed errors. Kernels without it get the fallback: a file
//! backing is first allocated with `fallocate(0)` (which fails cleanly with `ENOSPC` or
//! `ENOMEM`, so a hugetlb pool shortage cannot become a SIGBUS), then one byte per page is
//! read and written back.

use std::collections::VecDeque;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};

use crate::backing::HugePageSize;
use crate::error::{classify_populate_error, MemoryBackendError};
use crate::sys;

/// How to fault memory in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PopulateMethod {
    /// `MADV_POPULATE_WRITE` when the kernel has it, else [`PopulateMethod::Touch`].
    #[default]
    Auto,
    /// `madvise(MADV_POPULATE_WRITE)` only (fails with `EINVAL` on kernels before 5.14).
    MadvisePopulateWrite,
    /// `fallocate` the file range (file backings), then read and write back one byte per
    /// page: what older kernels need, and the naive baseline of the benchmark.
    Touch,
}

/// Options for populating a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PopulateOptions {
    /// Worker threads, the caller included; `None` means the available cores. Capped so
    /// that each thread gets at least `min_bytes_per_thread` and one chunk.
    pub threads: Option<NonZeroUsize>,
    /// How to fault pages in.
    pub method: PopulateMethod,
    /// Below this many bytes per thread, fewer threads are used (starting a thread costs
    /// tens of microseconds; populating 16 MiB takes a few milliseconds).
    pub min_bytes_per_thread: u64,
}

impl Default for PopulateOptions {
    fn default() -> Self {
        Self {
            threads: None,
            method: PopulateMethod::Auto,
            min_bytes_per_thread: 16 << 20,
        }
    }
}

impl PopulateOptions {
    /// Options with a fixed number of threads and the default method.
    pub fn with_threads(threads: NonZeroUsize) -> Self {
        Self {
            threads: Some(threads),
            ..Self::default()
        }
    }
}

/// What a populate call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PopulateReport {
    /// Threads that worked (the caller included); 0 for a plug whose whole range was
    /// staged, and so populated, before.
    pub threads: usize,
    /// The method used (never [`PopulateMethod::Auto`]).
    pub method: PopulateMethod,
}

/// The memory a populate call works on.
pub(crate) struct Target<'a> {
    /// Host address of region offset 0 (a number, so the target can be shared with the
    /// worker threads; it is only turned back into a pointer for system calls and touch).
    pub(crate) base: usize,
    /// Backing page size.
    pub(crate) page_size: u64,
    /// Hugetlb page size, for error classification.
    pub(crate) hugetlb: Option<HugePageSize>,
    /// The backing file, whose offsets equal region offsets.
    pub(crate) file: Option<&'a File>,
}

/// Largest chunk one worker takes at a time.
const MAX_CHUNK: u64 = 32 << 20;
/// Chunks per thread, for load balance when a thread is descheduled.
const CHUNKS_PER_THREAD: u64 = 16;

/// Picks the chunk size and thread count for `len` bytes.
fn plan(len: u64, page_size: u64, opts: &PopulateOptions) -> (u64, usize) {
    let wanted = opts
        .threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, NonZeroUsize::get);
    let by_size = usize::try_from(len / opts.min_bytes_per_thread.max(1))
        .unwrap_or(usize::MAX)
        .max(1);
    let threads = wanted.min(by_size).max(1);
    let granule = page_size.max(2 << 20);
    let per = len.div_ceil(
        u64::try_from(threads)
            .unwrap_or(1)
            .saturating_mul(CHUNKS_PER_THREAD),
    );
    let chunk = per
        .div_ceil(granule)
        .saturating_mul(granule)
        .clamp(granule, MAX_CHUNK.max(granule));
    let chunks = usize::try_from(len.div_ceil(chunk)).unwrap_or(usize::MAX);
    (chunk, threads.min(chunks).max(1))
}

/// The method `method` stands for on this kernel (never [`PopulateMethod::Auto`]).
pub(crate) fn resolve(method: PopulateMethod) -> PopulateMethod {
    match method {
        PopulateMethod::Auto if sys::populate_write_supported() => {
            PopulateMethod::MadvisePopulateWrite
        }
        PopulateMethod::Auto => PopulateMethod::Touch,
        m => m,
    }
}

/// Populates region range `[offset, offset+len)`.
///
/// # Safety
///
/// The range lies inside the region described by `target`, is mapped readable and
/// writable, stays so until this returns (the caller holds the region's operation lock),
/// and no Rust reference points into it (with [`PopulateMethod::Touch`] each page's first
/// byte is read and written back).
pub(crate) unsafe fn populate(
    target: &Target<'_>,
    offset: u64,
    len: u64,
    opts: &PopulateOptions,
) -> Result<PopulateReport, MemoryBackendError> {
    let method = resolve(opts.method);
    let (chunk, threads) = plan(len, target.page_size, opts);
    let job = Arc::new(Job {
        base: target.base,
        page_size: target.page_size,
        hugetlb: target.hugetlb,
        fd: target.file.map(AsRawFd::as_raw_fd),
        offset,
        len,
        chunk,
        method,
        next: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
        active: Mutex::new(0),
        idle: Condvar::new(),
        joined: AtomicUsize::new(0),
    });
    let pool = if threads > 1 { Pool::get() } else { None };
    if let Some(pool) = pool {
        pool.offer(&job, threads - 1);
    }
    // SAFETY: the caller's guarantees (# Safety) hold for the whole call.
    unsafe { job.work() };
    if let Some(pool) = pool {
        // No helper may start on this job once we return: withdraw the offers nobody
        // took, then wait for the helpers that did take one.
        pool.withdraw(&job);
        let mut active = lock(&job.active);
        while *active > 0 {
            active = job
                .idle
                .wait(active)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
    let used = 1 + job.joined.load(Ordering::Relaxed);
    let error = lock(&job.first_error).take();
    match error {
        Some(e) => Err(e),
        None => Ok(PopulateReport {
            threads: used,
            method,
        }),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One populate call, shared between the calling thread and pool helpers.
struct Job {
    base: usize,
    page_size: u64,
    hugetlb: Option<HugePageSize>,
    /// The backing file's descriptor; open for the whole job because the caller holds a
    /// reference to the file until the job is finished.
    fd: Option<RawFd>,
    offset: u64,
    len: u64,
    chunk: u64,
    method: PopulateMethod,
    /// Next job-relative byte to hand out.
    next: AtomicU64,
    failed: AtomicBool,
    first_error: Mutex<Option<MemoryBackendError>>,
    /// Helpers currently inside [`Job::work`].
    active: Mutex<usize>,
    idle: Condvar,
    /// Helpers that took part.
    joined: AtomicUsize,
}

impl Job {
    /// Takes chunks until none is left or one failed.
    ///
    /// # Safety
    ///
    /// The job's range is mapped RW and unreferenced (see [`populate`]), and its caller
    /// is still blocked in [`populate`].
    unsafe fn work(&self) {
        while !self.failed.load(Ordering::Relaxed) {
            let start = self.next.fetch_add(self.chunk, Ordering::Relaxed);
            if start >= self.len {
                break;
            }
            let this = self.chunk.min(self.len - start);
            // SAFETY: the chunk is inside the job's range (see # Safety).
            if let Err(e) = unsafe { populate_chunk(self, self.offset + start, this) } {
                self.failed.store(true, Ordering::Relaxed);
                lock(&self.first_error).get_or_insert(e);
                break;
            }
        }
    }
}

/// Helper threads kept across populate calls. A thread that is woken up gets a core at
/// once, where a freshly spawned one may wait milliseconds for a busy core, which is a
/// large share of a 1 GiB populate (~0.1 s).
struct Pool {
    /// Offers: one entry per helper wanted by a job.
    queue: Mutex<VecDeque<Arc<Job>>>,
    ready: Condvar,
}

impl Pool {
    /// The process-wide pool with one helper per available core but one, started on
    /// first use; `None` on a single-core host or if no helper could be started.
    fn get() -> Option<&'static Pool> {
        static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
        *POOL.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
            let pool: &'static Pool = Box::leak(Box::new(Pool {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
            }));
            let mut started = 0;
            for i in 1..cores {
                match std::thread::Builder::new()
                    .name(format!("mem-populate-{i}"))
                    .spawn(move || pool.run())
                {
                    Ok(_) => started += 1,
                    Err(e) => log::warn!("populate: could not start helper thread {i}: {e}"),
                }
            }
            (started > 0).then_some(pool)
        })
    }

    fn offer(&self, job: &Arc<Job>, helpers: usize) {
        let mut q = lock(&self.queue);
        q.extend(std::iter::repeat_n(Arc::clone(job), helpers));
        drop(q);
        self.ready.notify_all();
    }

    fn withdraw(&self, job: &Arc<Job>) {
        lock(&self.queue).retain(|j| !Arc::ptr_eq(j, job));
    }

    fn run(&self) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if let Some(job) = q.pop_front() {
                        // Registered while the queue is locked, so a caller that
                        // withdraws its offers afterwards waits for this helper.
                        *lock(&job.active) += 1;
                        break job;
                    }
                    q = self.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
            };
            job.joined.fetch_add(1, Ordering::Relaxed);
            // SAFETY: the job's caller is blocked in `populate` until `active` drops to
            // 0, so its guarantees hold while we work.
            unsafe { job.work() };
            let mut active = lock(&job.active);
            *active -= 1;
            drop(active);
            job.idle.notify_all();
        }
    }
}

/// Populates one chunk.
///
/// # Safety
///
/// As for [`populate`], for `[offset, offset+len)`.
unsafe fn populate_chunk(target: &Job, offset: u64, len: u64) -> Result<(), MemoryBackendError> {
    let method = target.method;
    let classify = |op, e| classify_populate_error(op, e, target.hugetlb, offset, len);
    // Region offsets and lengths fit in usize: the region was mapped with a usize length.
    let (off, l) = (to_usize(offset), to_usize(len));
    let Some(ptr) = NonNull::new((target.base + off) as *mut u8) else {
        return Ok(());
    };
    if method == PopulateMethod::MadvisePopulateWrite {
        loop {
            // SAFETY: the range is ours, mapped RW and unreferenced (see # Safety);
            // MADV_POPULATE_WRITE only faults pages in and does not change contents.
            match unsafe { sys::advise(ptr, l, libc::MADV_POPULATE_WRITE) } {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.map_err(|e| classify("madvise(MADV_POPULATE_WRITE)", e)),
            }
        }
    }
    if let Some(fd) = target.fd {
        // SAFETY: the populate caller holds a reference to the backing file until the
        // job is finished (see `Job::fd`), so the descriptor is open.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        // Allocate the file's pages first: a failure here is an error code, whereas a
        // fault on a hugetlb mapping with an empty pool would be a SIGBUS.
        sys::fallocate(fd, 0, offset, len).map_err(|e| classify("fallocate", e))?;
    }
    let page = to_usize(target.page_size);
    let mut at = 0;
    while at < l {
        let p = ptr.as_ptr().wrapping_add(at);
        // SAFETY: p is inside the range, which is mapped RW (see # Safety) and, for file
        // backings, allocated by the fallocate above, so the access cannot raise SIGBUS
        // for a missing page. Volatile so the compiler keeps the access; no reference
        // is created. Reading and writing back keeps the contents.
        unsafe { p.write_volatile(p.read_volatile()) };
        at += page;
    }
    Ok(())
}

/// Converts a region offset or length, which fits the usize mapping length, to usize.
fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(threads: usize) -> PopulateOptions {
        PopulateOptions::with_threads(NonZeroUsize::new(threads).unwrap())
    }

    #[test]
    fn plan_uses_one_thread_for_small_ranges() {
        assert_eq!(plan(2 << 20, 4096, &opts(8)), (2 << 20, 1));
        assert_eq!(plan(8 << 20, 4096, &opts(8)).1, 1);
    }

    #[test]
    fn plan_splits_large_ranges_in_aligned_chunks() {
        let (chunk, threads) = plan(1 << 30, 4096, &opts(2));
        assert_eq!(threads, 2);
        assert_eq!(chunk % (2 << 20), 0);
        assert!(chunk <= MAX_CHUNK);
        assert!((1u64 << 30).div_ceil(chunk) >= 2 * CHUNKS_PER_THREAD);
    }

    #[test]
    fn plan_respects_huge_page_granule() {
        let (chunk, threads) = plan(2 << 30, 1 << 30, &opts(4));
        assert_eq!(chunk, 1 << 30);
        assert_eq!(threads, 2);
    }
}
