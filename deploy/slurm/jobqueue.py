"""Start workers through dask-jobqueue and process every scan that arrives.

    pip install dask-jobqueue
    python deploy/slurm/jobqueue.py --connect tcp://detector-host:6001 --sources 4 --jobs 4 --out /scratch/scans
"""

import argparse

from dask_jobqueue import SLURMCluster
from distributed import Client

from stream.session import Session, expand_sources

p = argparse.ArgumentParser()
p.add_argument("--connect", required=True)
p.add_argument("--sources", type=int, default=4)
p.add_argument("--jobs", type=int, default=2, help="SLURM jobs, each one worker process")
p.add_argument("--out", required=True)
p.add_argument("--config")
p.add_argument("--queue", default="regular")
p.add_argument("--walltime", default="08:00:00")
args = p.parse_args()

cluster = SLURMCluster(cores=2, processes=1, memory="16GB", queue=args.queue,
                       walltime=args.walltime, worker_extra_args=["--nthreads", "1"])
cluster.scale(jobs=args.jobs)
with Client(cluster) as client:
    client.wait_for_workers(args.jobs)
    with Session(expand_sources([args.connect], args.sources), out=args.out, config=args.config,
                 client=client) as session:
        while True:
            session.wait()
