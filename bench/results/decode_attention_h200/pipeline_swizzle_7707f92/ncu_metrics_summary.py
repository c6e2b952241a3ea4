import csv, glob, sys, os, io
for f in sorted(glob.glob(sys.argv[1] + "/m_*.csv")):
    lines = open(f).read().splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None: print(os.path.basename(f), "no rows"); continue
    rows = list(csv.reader(io.StringIO("\n".join(lines[start:]))))
    h = rows[0]; ix = {k: i for i, k in enumerate(h)}
    print("==", os.path.basename(f))
    for r in rows[1:]:
        if len(r) < len(h): continue
        v = r[ix["Metric Value"]]
        try:
            if float(v.replace(",", "")) == 0: continue
        except ValueError: pass
        print("   %-80s %s %s" % (r[ix["Metric Name"]], v, r[ix["Metric Unit"]]))
