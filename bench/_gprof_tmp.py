import time, torch, sys, os
sys.path.insert(0, os.getcwd())
from bench.train_bench import *
from kava_dist.config import load_config
from kava_dist.step import kava_terms, online_step
from kava_dist import engine as E
stage = sys.argv[1]
cfg = load_config(None, ["lora.r=128","lora.alpha=32","lora.dropout=0.1","latent.num_latents=24","latent.num_iterations=3","train.global_batch=64","train.micro_batch=64","train.max_steps=100","train.warmup_ratio=0"])
dist = E.init_distributed()
dev = dist.device
model, special, mc = random_backbone("1b", cfg, dev, torch.bfloat16)
items = synth_examples(64, 100, 150, 10)
b = collate(items, special.pad).to(dev)
tg = make_targets(model, items, cfg, special, dev, 32)
t = Targets(*(torch.stack([tg[e.id][k] for e in items]) for k in ("k","v","valid","codi_h")))
def sync(): torch.cuda.synchronize()
model.train()
# plain (no DeepSpeed)
for i in range(3):
    sync(); t0=time.time()
    terms = kava_terms(model, b, special, t, cfg) if stage=="student" else online_step(model, b, special, cfg)
    sync(); t1=time.time(); terms["loss"].backward(); sync(); t2=time.time()
    print(f"plain {stage} fwd {t1-t0:.3f} bwd {t2-t1:.3f}", flush=True)
model.zero_grad(set_to_none=True)
mod = E.StageModule(model, stage, special, cfg)
eng = E.build_engine(mod, cfg.train, 100, dist)
for i in range(3):
    sync(); t0=time.time(); terms = eng(b, t); sync(); t1=time.time(); eng.backward(terms["loss"]); sync(); t2=time.time(); eng.step(); sync(); t3=time.time()
    print(f"engine {stage} fwd {t1-t0:.3f} bwd {t2-t1:.3f} step {t3-t2:.3f}", flush=True)
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    terms = eng(b, t); eng.backward(terms["loss"]); eng.step(); sync()
ka = p.key_averages()
print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=55))
tot_cuda = sum(e.self_device_time_total for e in ka) / 1e3
print("self cuda ms", tot_cuda)
for name in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize", "aten::nonzero", "cudaLaunchKernel", "aten::is_nonzero"):
    ev = [e for e in ka if e.key == name]
    if ev: print(name, ev[0].count, round(ev[0].cpu_time_total/1e3,1), "ms")
# wall without profiler, per phase
import time
for i in range(2):
    sync(); t0=time.time(); terms = eng(b, t); t1=time.time(); sync(); t2=time.time(); eng.backward(terms["loss"]); t3=time.time(); sync(); t4=time.time()
    print(f"fwd launch {t1-t0:.3f} fwd wait {t2-t1:.3f} bwd launch {t3-t2:.3f} bwd wait {t4-t3:.3f}"); eng.step()
