import csv, sys, collections, re
f = sys.argv[1]
rows = list(csv.reader(open(f)))
hdr = rows[1]; data = rows[2:]
ix = {h:i for i,h in enumerate(hdr)}
def g(r, k):
    try: return float(r[ix[k]])
    except: return 0.0
# hot: instructions executed max
ex = [g(r,"Instructions Executed") for r in data]
mx = max(ex)
tot_samples = sum(g(r,"Warp Stall Sampling (All Samples)") for r in data)
# iterations: loop body = instructions with executed >= 0.5*max
thr = float(sys.argv[2]) if len(sys.argv)>2 else 0.5
body = [r for r in data if g(r,"Instructions Executed") >= thr*mx]
print(f, "max exec", mx, "body instrs", len(body), "sum exec in body/max", sum(g(r,'Instructions Executed') for r in body)/mx)
ops = collections.Counter()
opsamp = collections.Counter()
for r in body:
    op = r[ix["Source"]].strip()
    op = re.sub(r"^@!?U?P\w+\s+", "", op).split()[0]
    w = g(r,"Instructions Executed")/mx
    ops[op] += w
    opsamp[op] += g(r,"Warp Stall Sampling (All Samples)")
bs = sum(g(r,"Warp Stall Sampling (All Samples)") for r in body)
print("samples in body %.1f%%" % (100*bs/tot_samples))
for op, c in sorted(ops.items(), key=lambda x:-x[1]):
    print(f"  {op:12s} {c:7.1f}   samples {100*opsamp[op]/tot_samples:5.1f}%")
st = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
tot = {h: sum(g(r,h) for r in data) for h in st}
T = sum(tot.values())
print("stalls:", ", ".join(f"{h[6:]} {100*v/T:.1f}%" for h,v in sorted(tot.items(), key=lambda x:-x[1]) if v/T>0.01))
