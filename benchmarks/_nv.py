import torch, harness, sys
import bench_nvae_cell as B
dev=torch.device('cpu')
for shape in [(32,192,16,16),(32,384,8,8),(32,192,32,32)]:
  for var in ("eval_cl","train_cl","eval_cl"):
    eager, ours, cl = B.VARIANTS[var]
    args = B.make_args(shape, torch.float32, 'cpu', cl)(False)
    pool=[(a,None) for a in harness.make_pool(args, harness.last_level_cache_bytes(dev))]
    r={}
    for name,f in (("eager",eager),("ours",ours))*2:
        st=harness.as_step(f,"fwd")
        r.setdefault(name,[]).append(harness.time_ms(harness.rotating(st,pool), dev, False)[0])
    print(var, shape, {k:[round(x,3) for x in v] for k,v in r.items()}, round(min(r['eager'])/min(r['ours']),2), len(pool), flush=True)
