"""Per-batch product of H on one 4096 x n float32 batch: torch ``x.T @ x``, BLAS ``ssyrk``
(:func:`llm_adapter.calibration.statistics.gram_update`) and torch's upper block triangle
with k = 2, 4, 8 blocks; best of 4 repetitions, wall and CPU milliseconds (issue #18).

Usage (threads for torch as the argument, for OpenBLAS in the environment)::

    OPENBLAS_NUM_THREADS=1 python benchmarks/stats_gram_micro.py 1
    OPENBLAS_NUM_THREADS=2 python benchmarks/stats_gram_micro.py 2
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_adapter.calibration.statistics import gram_update  # noqa: E402

nt=int(sys.argv[1]); torch.set_num_threads(nt)
g=torch.Generator().manual_seed(0)
def tri(x, out, k):
    n=x.shape[1]; e=[round(i*n/k) for i in range(k+1)]
    for i in range(k):
        a,b=e[i],e[i+1]
        torch.mm(x[:,a:b].T, x[:,a:], out=out[a:b, a:])
for n in (576, 1536):
    x=torch.randn(4096,n,generator=g)
    out=torch.zeros(n,n); sc=np.zeros((n,n),np.float32,order='F')
    fs={'mm':lambda: torch.mm(x.T,x,out=out),'syrk':lambda: gram_update(x,sc)}
    for k in (2,4,8): fs[f'tri{k}']=lambda k=k: tri(x,out,k)
    res={}
    for rep in range(4):
        for nm,f in fs.items():
            f(); w0=time.perf_counter(); c0=time.process_time(); f(); f()
            res.setdefault(nm,[]).append(((time.perf_counter()-w0)/2,(time.process_time()-c0)/2))
    print(nt, n, {k:(round(min(a for a,b in v)*1e3,1), round(min(b for a,b in v)*1e3,1)) for k,v in res.items()}, os.getloadavg()[0])
