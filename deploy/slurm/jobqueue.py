"""Start the dask workers as SLURM jobs through dask-jobqueue and process every scan that arrives.

    pip install dask-jobqueue
    python deploy/slurm/jobqueue.py --connect tcp://detector-host:6001 --sources 4 --jobs 4 \
        --out /scratch/scans --queue regular --interface ib0

The dask scheduler and the coordinator run in this process (on a login or workflow node);
every SLURM job is one worker process with one thread (one receiver). Takes the options of
``stemstream process`` (except --scheduler and --workers) plus the job's shape. dask's traffic
is TLS with a certificate made for this run; the worker jobs read it from a private (0700)
directory under --out (the shared file system), removed at the end. Ctrl-C or
SIGTERM stops it: open scans are written (incomplete, their missing frames named), then the
worker jobs are cancelled.
"""

import argparse
import os
import shutil
import signal
import tempfile

from dask_jobqueue import SLURMCluster
from distributed import Client
from distributed.security import Security

from stream.cli.commands import add_process_args, session_from_args
from stream.config import ConfigError
from stream.security.tls import write_tls_files

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
add_process_args(p)
p.add_argument("--jobs", type=int, default=2, help="SLURM jobs, each one worker process (default 2)")
p.add_argument("--cores", type=int, default=2, help="cores per job: the receiver's and the task's (default 2)")
p.add_argument("--memory", default="16GB", help="memory per job (default 16GB)")
p.add_argument("--queue", help="SLURM partition (default: the site's default partition)")
p.add_argument("--walltime", default="08:00:00", help="time limit per job (default 08:00:00)")
p.add_argument("--interface", help="network interface for dask, e.g. ib0 (default: dask's choice)")
p.add_argument("--log-directory", help="where the worker jobs' SLURM output goes (default: here)")
args = p.parse_args()
if args.scheduler or args.workers:
    p.error("--scheduler and --workers do not apply: the workers are the --jobs SLURM jobs")
if args.jobs < 1:
    p.error("--jobs must be at least 1")


def tls_files(directory: str) -> Security:
    """A CA and certificate made for this run (``stemstream keys --tls``), where the worker jobs read them."""
    f = {k: str(v) for k, v in write_tls_files(directory).items()}
    return Security(tls_ca_file=f["ca"], tls_scheduler_cert=f["cert"], tls_scheduler_key=f["key"],
                    tls_worker_cert=f["cert"], tls_worker_key=f["key"], tls_client_cert=f["cert"],
                    tls_client_key=f["key"], require_encryption=True)


def _stop(*_):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated stop must not cut the clean-up short
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _stop)
out = args.out or "out"
os.makedirs(out, exist_ok=True)
tls_dir = tempfile.mkdtemp(prefix=".jobqueue-tls-", dir=out)  # 0700: the workers' key is in it
security = tls_files(tls_dir)
cluster = SLURMCluster(cores=args.cores, processes=1, memory=args.memory, queue=args.queue,
                       walltime=args.walltime, interface=args.interface, log_directory=args.log_directory,
                       scheduler_options={"dashboard_address": ":0"}, security=security, protocol="tls://",
                       worker_extra_args=["--nthreads", "1"])
try:
    cluster.scale(jobs=args.jobs)
    with Client(cluster, security=cluster.security) as client:
        print(f"jobqueue.py: waiting for {args.jobs} worker jobs", flush=True)
        client.wait_for_workers(args.jobs)
        try:
            with session_from_args(args, client=client) as session:
                session.console.say("processing every scan that arrives; Ctrl-C to stop")
                while True:
                    session.wait(timeout=None)
        except ConfigError as e:
            raise SystemExit(f"jobqueue.py: {e}") from None
except KeyboardInterrupt:
    print("jobqueue.py: stopped; cancelling the worker jobs", flush=True)
finally:
    cluster.close()
    shutil.rmtree(tls_dir, ignore_errors=True)
