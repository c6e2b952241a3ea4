#!/usr/bin/env python3
"""Build the English training corpus for models/pmkv-ref from Debian packages.

Step 1 of tools/refmodel (see models/pmkv-ref/README.md). Only the standard library is used,
plus the Debian tools `apt-get download`, `dpkg -x`, `tar`, `man`/`groff` and `pod2text`.

    python3 tools/refmodel/build_corpus.py --work /tmp/pmkv-corpus

downloads the packages listed in SOURCES into WORK/debs (skipped when already there), unpacks
them into WORK/x, turns each source into documents and writes

    WORK/corpus/train.txt      training documents, separated by the line "\\x1e" (RS)
    WORK/corpus/heldout.txt    held-out documents (never trained on), same format
    WORK/corpus/heldout_sample.txt   ~300 KB of held-out text for quality runs
                                     (models/pmkv-ref/heldout.txt is a copy of it)
    WORK/corpus/sources.json   per source: package, version, license, documents, bytes

A document goes to the held-out split when the first 8 hex digits of
sha256("<source>/<doc id>") taken mod 100 equal 0 (1% of documents, deterministic).
Exact duplicate documents (same text) are kept once.
"""
import argparse
import gzip
import hashlib
import html.parser
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
from pathlib import Path

RS = "\x1e"

# source name -> (packages, license summary, description)
SOURCES = {
    "linux-docs": (["linux-source-6.1"], "GPL-2.0 (Linux kernel Documentation/, some files dual-licensed GPL-2.0/CC-BY-4.0 or GFDL)",
                   "Linux 6.1 kernel Documentation/ (.rst/.txt, translations/ excluded)"),
    "python-docs": (["python3.11-doc"], "PSF License 2.0", "Python 3.11 documentation (reST sources)"),
    "django-docs": (["python-django-doc"], "BSD-3-Clause", "Django 3.2 documentation (HTML to text)"),
    "postgresql-docs": (["postgresql-doc-15"], "PostgreSQL License", "PostgreSQL 15 manual (HTML to text)"),
    "sqlite-docs": (["sqlite3-doc"], "public domain", "SQLite 3.40 documentation (HTML to text)"),
    "perl-docs": (["perl-doc"], "GPL-1+ or Artistic", "Perl 5.36 core documentation (pod2text)"),
    "git-docs": (["git-doc"], "GPL-2", "Git 2.39 documentation (AsciiDoc text)"),
    "man-pages": (["manpages", "manpages-dev"], "Linux man-pages licenses (Linux-man-pages-copyleft, GPL-2+, BSD, Expat, ...)",
                  "Linux man-pages 6.03, sections 1-8 (rendered with man, 80 columns)"),
    "debian-handbook": (["debian-handbook"], "GPL-2.0+ or CC-BY-SA-3.0", "The Debian Administrator's Handbook, en-US (HTML to text)"),
    "debian-reference": (["debian-reference-en"], "GPL-2+", "Debian Reference, English (HTML to text)"),
    "debian-policy": (["debian-policy"], "GPL-2+ (FHS: FHS license)", "Debian Policy Manual (reST sources) and FHS"),
    "developers-reference": (["developers-reference"], "GPL-2", "Debian Developer's Reference (reST sources)"),
    "maint-guide": (["maint-guide"], "MIT / GPL-2.0+", "Debian New Maintainers' Guide, English (HTML to text)"),
    "debian-faq": (["debian-faq"], "GPL-2+ style permission notice (SPI)", "The Debian GNU/Linux FAQ, English (HTML to text)"),
    "harden-doc": (["harden-doc"], "GPL-2.0", "Securing Debian Manual, en-US (HTML to text)"),
    "gnu-standards": (["gnu-standards"], "GFDL-1.3+ (no invariant sections)", "GNU Coding Standards and GNU Maintainer Information (plain text)"),
    "bash-manual": (["bash-doc"], "GFDL-1.3+ / GPL-3+", "Bash Reference Manual (info)"),
    "kjv-bible": (["bible-kjv-text", "bible-kjv"], "public domain text (packaging GPL-2+)", "King James Bible, one document per chapter"),
    "gcide": (["dict-gcide"], "GPL-3+ (GCIDE, from Webster's 1913)", "GNU Collaborative International Dictionary of English"),
    "wordnet": (["dict-wn"], "WordNet 3.0 license (BSD-like)", "WordNet 3.0 (dictd format)"),
    "foldoc": (["dict-foldoc"], "GFDL-1.1+", "Free On-line Dictionary of Computing"),
    "jargon": (["dict-jargon"], "public domain", "The Jargon File 4.4.7"),
    "devils-dictionary": (["dict-devil"], "public domain", "The Devil's Dictionary by Ambrose Bierce"),
    "fortunes": (["fortunes", "fortunes-min"], "BSD-4-Clause (fortune) / various, public domain quotations",
                 "fortune cookie files (non-offensive set, ascii-art excluded), one document per fortune"),
}


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def fetch(work: Path):
    debs = work / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    pkgs = sorted({p for v in SOURCES.values() for p in v[0]})
    missing = [p for p in pkgs if not list(debs.glob(p + "_*.deb"))]
    if missing:
        print("apt-get download", " ".join(missing), flush=True)
        run(["apt-get", "download", *missing], cwd=debs)
    versions = {}
    for p in pkgs:
        deb = sorted(debs.glob(p + "_*.deb"))[-1]
        versions[p] = deb.name.split("_")[1].replace("%3a", ":")
        dst = work / "x" / p
        if not dst.exists():
            dst.mkdir(parents=True)
            run(["dpkg", "-x", str(deb), str(dst)])
    ldoc = work / "linux" / "linux-source-6.1" / "Documentation"
    if not ldoc.exists():
        (work / "linux").mkdir(exist_ok=True)
        tarxz = work / "x/linux-source-6.1/usr/src/linux-source-6.1.tar.xz"
        run(["tar", "-xJf", str(tarxz), "-C", str(work / "linux"), "--wildcards", "linux-source-6.1/Documentation/*"])
    return versions


# ----------------------------------------------------------------------------- text clean-up

def tidy(text: str) -> str:
    """Normalise line ends, strip trailing spaces, drop control characters, squeeze blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    lines = [ln.rstrip() for ln in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


class HtmlText(html.parser.HTMLParser):
    """Tiny HTML to text: block tags become line breaks, <pre> keeps its layout,
    script/style/head/nav and Sphinx side bars are dropped."""
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6",
             "table", "tr", "blockquote", "section", "article", "hr", "pre", "title", "td", "th"}
    SKIP = {"script", "style", "head", "nav", "footer", "header", "noscript", "svg", "button", "form"}
    SKIP_CLASS = re.compile(r"sphinxsidebar|related|navheader|navfooter|footer|header|breadcrumb|toc|"
                            r"headerlink|nav|sidebar|copyright|highlight-none-notranslate-skip")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out = []
        self.skip_depth = 0
        self.stack = []
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "hr", "img", "meta", "link", "input", "col", "area", "base", "wbr"):
            if tag in ("br", "hr") and not self.skip_depth:
                self.out.append("\n")
            return
        cls = dict(attrs).get("class") or ""
        role = dict(attrs).get("role") or ""
        skip = tag in self.SKIP or role == "navigation" or (
            tag in ("div", "span", "a", "p", "table", "ul") and self.SKIP_CLASS.search(cls) is not None
            and "highlight" not in cls)
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1
        if self.skip_depth:
            return
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK:
            self.out.append("\n\n" if tag in ("p", "pre", "h1", "h2", "h3", "h4", "table", "dl", "ul", "ol") else "\n")
        if tag == "li":
            self.out.append("- ")
        if tag in ("td", "th"):
            self.out.append(" ")

    def handle_endtag(self, tag):
        # pop to the matching tag (HTML in the wild is not always well nested)
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                for t, skip in self.stack[i:]:
                    if skip:
                        self.skip_depth -= 1
                    if t == "pre" and not self.skip_depth:
                        self.pre = max(0, self.pre - 1)
                del self.stack[i:]
                break
        if not self.skip_depth and tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data):
        if self.skip_depth:
            return
        if self.pre:
            self.out.append(data)
        else:
            self.out.append(re.sub(r"\s+", " ", data))

    def text(self):
        t = "".join(self.out)
        t = "\n".join(ln.strip() if not ln.startswith("    ") else ln.rstrip() for ln in t.split("\n"))
        return tidy(t.replace("\u00b6", ""))


def html_to_text(path: Path) -> str:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    p = HtmlText()
    p.feed(raw)
    p.close()
    return p.text()


def drop_boilerplate(docs, min_docs=20, frac=0.05):
    """Remove short lines that occur in many documents of one source (navigation, footers)."""
    from collections import Counter
    cnt = Counter()
    for _, t in docs:
        cnt.update({ln.strip() for ln in t.split("\n") if 0 < len(ln.strip()) < 100})
    limit = max(min_docs, frac * len(docs))
    bad = {ln for ln, c in cnt.items() if c > limit}
    out = []
    for did, t in docs:
        t = tidy("\n".join(ln for ln in t.split("\n") if ln.strip() not in bad))
        out.append((did, t))
    return out


def info_to_text(raw: str) -> str:
    # info files: nodes separated by \x1f, each starting with a "File: ..., Node: ..." line
    parts = []
    for node in raw.split("\x1f"):
        lines = node.strip("\n").split("\n")
        if lines and lines[0].startswith("File:"):
            lines = lines[1:]
        if lines and lines[0].startswith(("Tag Table:", "End Tag Table", "Local Variables")):
            continue
        parts.append("\n".join(lines))
    return tidy("\n\n".join(parts))


# ----------------------------------------------------------------------------- sources
# each returns a list of (doc_id, text)

def src_linux(work):
    root = work / "linux/linux-source-6.1/Documentation"
    docs = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith("translations/") or p.suffix not in (".rst", ".txt"):
            continue
        t = p.read_bytes().decode("utf-8", errors="replace")
        docs.append((rel, tidy(t)))
    return docs


def src_rst_tree(root: Path, pattern="*.txt"):
    docs = []
    for p in sorted(root.rglob(pattern)):
        if p.is_file():
            docs.append((p.relative_to(root).as_posix(), tidy(p.read_text("utf-8", errors="replace"))))
    return docs


def src_python(work):
    return src_rst_tree(work / "x/python3.11-doc/usr/share/doc/python3.11/html/_sources", "*.rst.txt")


def html_tree(root: Path, pattern="*.html", exclude=None):
    paths = [p for p in sorted(root.rglob(pattern)) if p.is_file() and not (exclude and exclude(p))]
    with mp.Pool() as pool:
        texts = pool.map(html_to_text, paths, chunksize=8)
    return drop_boilerplate([(p.relative_to(root).as_posix(), t) for p, t in zip(paths, texts)])


def src_django(work):
    root = work / "x/python-django-doc/usr/share/doc/python-django-doc/html"
    return html_tree(root, exclude=lambda p: p.name in ("genindex.html", "py-modindex.html", "search.html")
                     or "_modules" in p.parts)


def src_postgres(work):
    root = work / "x/postgresql-doc-15/usr/share/doc/postgresql-doc-15/html"
    return html_tree(root, exclude=lambda p: p.name.startswith(("bookindex", "release-")))


def src_sqlite(work):
    root = work / "x/sqlite3-doc/usr/share/doc/sqlite3"
    return html_tree(root, exclude=lambda p: "c3ref" in p.parts and p.name in ("funclist.html", "objlist.html", "constlist.html"))


def pod_one(p):
    r = subprocess.run(["pod2text", "-w", "80", str(p)], capture_output=True)
    return r.stdout.decode("utf-8", errors="replace")


def src_perl(work):
    root = work / "x/perl-doc/usr/share/perl"
    paths = sorted(p for p in root.rglob("*.pod") if p.is_file())
    with mp.Pool() as pool:
        texts = pool.map(pod_one, paths, chunksize=4)
    return [(p.relative_to(root).as_posix(), tidy(t)) for p, t in zip(paths, texts)]


def src_git(work):
    root = work / "x/git-doc/usr/share/doc/git-doc"
    docs = []
    for p in sorted(root.rglob("*.txt")):
        docs.append((p.relative_to(root).as_posix(), tidy(p.read_text("utf-8", errors="replace"))))
    return docs


def man_one(p):
    env = dict(os.environ, MANWIDTH="80", LANG="C.UTF-8", MAN_KEEP_FORMATTING="0")
    r = subprocess.run(["man", "-l", "-E", "UTF-8", str(p)], capture_output=True, env=env)
    t = r.stdout.decode("utf-8", errors="replace")
    return re.sub(r".\x08", "", t)


def src_man(work):
    paths = []
    for pkg in ("manpages", "manpages-dev"):
        root = work / "x" / pkg / "usr/share/man"
        for p in sorted(root.glob("man*/*.gz")):
            raw = gzip.open(p).read(200)
            if raw.startswith(b".so "):  # alias pages
                continue
            paths.append(p)
    with mp.Pool() as pool:
        texts = pool.map(man_one, paths, chunksize=8)
    return [(p.name, tidy(t)) for p, t in zip(paths, texts) if len(t) > 200]


def src_handbook(work):
    return html_tree(work / "x/debian-handbook/usr/share/doc/debian-handbook/html/en-US")


def src_debref(work):
    return html_tree(work / "x/debian-reference-en/usr/share/debian-reference", "*.en.html")


def src_policy(work):
    root = work / "x/debian-policy/usr/share/doc/debian-policy"
    docs = src_rst_tree(root / "policy.html/_sources", "*.txt")
    for p in sorted(root.glob("fhs/*.txt*")) + sorted(root.glob("*-policy.txt.gz")) + [root / "copyright-format-1.0.txt.gz"]:
        raw = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
        docs.append((p.name, tidy(raw.decode("utf-8", errors="replace"))))
    return docs


def src_devref(work):
    return src_rst_tree(work / "x/developers-reference/usr/share/developers-reference/_sources", "*.txt")


def src_maint(work):
    return html_tree(work / "x/maint-guide/usr/share/doc/maint-guide/html", "*.en.html")


def src_faq(work):
    root = work / "x/debian-faq/usr/share/doc/debian/FAQ"
    # both foo.html and foo.en.html exist for some pages: take the .en.html one when present
    paths = sorted(root.glob("*.html"))
    names = {p.name for p in paths}
    keep = [p for p in paths if p.name.endswith(".en.html") or p.name.replace(".html", ".en.html") not in names]
    docs = [(p.name, html_to_text(p)) for p in keep]
    return drop_boilerplate(docs, min_docs=5)


def src_harden(work):
    return html_tree(work / "x/harden-doc/usr/share/doc/harden-doc/html/en-US")


def src_gnu(work):
    root = work / "x/gnu-standards/usr/share/doc/gnu-standards"
    docs = []
    for name in ("standards.text.gz", "maintain.text.gz"):
        t = tidy(gzip.open(root / name).read().decode("utf-8", errors="replace"))
        docs += split_long(name, t)
    return docs


def src_bash(work):
    t = info_to_text(gzip.open(work / "x/bash-doc/usr/share/info/bash.info.gz").read().decode("utf-8", "replace"))
    return split_long("bash.info", t)


def split_long(did, text, target=60000):
    """Split a long text at blank lines into documents of about `target` characters."""
    paras = text.split("\n\n")
    docs, cur, n = [], [], 0
    for para in paras:
        cur.append(para)
        n += len(para) + 2
        if n >= target:
            docs.append((f"{did}#{len(docs)}", "\n\n".join(cur)))
            cur, n = [], 0
    if cur:
        docs.append((f"{did}#{len(docs)}", "\n\n".join(cur)))
    return docs


def src_kjv(work):
    exe = work / "x/bible-kjv/usr/bin/bible"
    data = work / "x/bible-kjv-text/usr/lib"
    out = subprocess.run([str(exe), "-f", "-p", str(data), "gen1:1-rev22:21"], capture_output=True).stdout
    names = {"Ge": "Genesis", "Ex": "Exodus", "Le": "Leviticus", "Nu": "Numbers", "De": "Deuteronomy",
             "Jos": "Joshua", "Jg": "Judges", "Ru": "Ruth", "1Sa": "1 Samuel", "2Sa": "2 Samuel",
             "1Ki": "1 Kings", "2Ki": "2 Kings", "1Ch": "1 Chronicles", "2Ch": "2 Chronicles", "Ezr": "Ezra",
             "Ne": "Nehemiah", "Es": "Esther", "Job": "Job", "Ps": "Psalms", "Pr": "Proverbs",
             "Ec": "Ecclesiastes", "So": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah",
             "La": "Lamentations", "Eze": "Ezekiel", "Da": "Daniel", "Ho": "Hosea", "Joe": "Joel",
             "Am": "Amos", "Ob": "Obadiah", "Jon": "Jonah", "Mic": "Micah", "Na": "Nahum", "Hab": "Habakkuk",
             "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah", "Mal": "Malachi", "Mt": "Matthew",
             "Mr": "Mark", "Lu": "Luke", "Joh": "John", "Ac": "Acts", "Ro": "Romans", "1Co": "1 Corinthians",
             "2Co": "2 Corinthians", "Ga": "Galatians", "Eph": "Ephesians", "Php": "Philippians",
             "Col": "Colossians", "1Th": "1 Thessalonians", "2Th": "2 Thessalonians", "1Ti": "1 Timothy",
             "2Ti": "2 Timothy", "Tit": "Titus", "Phm": "Philemon", "Heb": "Hebrews", "Jas": "James",
             "1Pe": "1 Peter", "2Pe": "2 Peter", "1Jo": "1 John", "2Jo": "2 John", "3Jo": "3 John",
             "Jude": "Jude", "Re": "Revelation", "Rev": "Revelation"}
    chapters = {}
    order = []
    for ln in out.decode("utf-8", "replace").split("\n"):
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", ln)
        if not m:
            continue
        book, ch, v, text = m.groups()
        key = (book, int(ch))
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(f"{v} {text.strip()}")
    docs = []
    for book, ch in order:
        title = names.get(book, book)
        docs.append((f"{book}{ch}", f"{title} {ch}\n\n" + "\n".join(chapters[(book, ch)])))
    return docs


def dictd_entries(dz: Path, index: Path):
    data = gzip.open(dz).read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def dec(s):
        n = 0
        for c in s:
            n = n * 64 + b64.index(c)
        return n
    seen = set()
    entries = []
    for ln in index.read_text("utf-8", errors="replace").split("\n"):
        parts = ln.split("\t")
        if len(parts) < 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        off, size = dec(parts[1]), dec(parts[2])
        if (off, size) in seen:
            continue
        seen.add((off, size))
        entries.append((off, data[off:off + size].decode("utf-8", errors="replace")))
    entries.sort()
    return [e for _, e in entries]


def dedent_entry(t: str) -> str:
    lines = t.strip("\n").split("\n")
    ind = min((len(ln) - len(ln.lstrip(" ")) for ln in lines[1:] if ln.strip()), default=0)
    return tidy("\n".join([lines[0]] + [ln[ind:] for ln in lines[1:]]))


def group_entries(name, entries, per_doc=25):
    docs = []
    for i in range(0, len(entries), per_doc):
        docs.append((f"{name}#{i // per_doc}", "\n\n".join(entries[i:i + per_doc])))
    return docs


def src_dict(work, pkg, name, clean=None, per_doc=25):
    d = work / "x" / pkg / "usr/share/dictd"
    dz = next(d.glob("*.dict.dz"))
    idx = next(d.glob("*.index"))
    ents = dictd_entries(dz, idx)
    out = []
    for e in ents:
        if clean:
            e = clean(e)
        e = dedent_entry(e)
        if len(e) > 20:
            out.append(e)
    return group_entries(name, out, per_doc)


def clean_gcide(e):
    e = re.sub(r"\n *\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.|[A-Za-z0-9 .]{1,30})\] *(?=\n|$)", "", e)
    return e


def src_gcide(work):
    return src_dict(work, "dict-gcide", "gcide", clean_gcide)


def src_wordnet(work):
    return src_dict(work, "dict-wn", "wn")


def src_foldoc(work):
    return src_dict(work, "dict-foldoc", "foldoc", per_doc=15)


def src_jargon(work):
    return src_dict(work, "dict-jargon", "jargon", per_doc=15)


def src_devil(work):
    return src_dict(work, "dict-devil", "devil", per_doc=15)


def src_fortunes(work):
    docs = []
    for pkg in ("fortunes-min", "fortunes"):
        root = work / "x" / pkg / "usr/share/games/fortunes"
        for p in sorted(root.glob("*.u8")):
            if p.stem in ("ascii-art",):
                continue
            raw = p.read_text("utf-8", errors="replace")
            for i, f in enumerate(re.split(r"\n%\n", raw)):
                f = tidy(f.strip("%\n"))
                if len(f) > 10:
                    docs.append((f"{p.stem}#{i}", f))
    return docs


EXTRACT = {
    "linux-docs": src_linux, "python-docs": src_python, "django-docs": src_django,
    "postgresql-docs": src_postgres, "sqlite-docs": src_sqlite, "perl-docs": src_perl, "git-docs": src_git,
    "man-pages": src_man, "debian-handbook": src_handbook, "debian-reference": src_debref,
    "debian-policy": src_policy, "developers-reference": src_devref, "maint-guide": src_maint,
    "debian-faq": src_faq, "harden-doc": src_harden, "gnu-standards": src_gnu, "bash-manual": src_bash,
    "kjv-bible": src_kjv, "gcide": src_gcide, "wordnet": src_wordnet, "foldoc": src_foldoc,
    "jargon": src_jargon, "devils-dictionary": src_devil, "fortunes": src_fortunes,
}


def is_heldout(source, did):
    h = hashlib.sha256(f"{source}/{did}".encode()).hexdigest()
    return int(h[:8], 16) % 100 == 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--sample-bytes", type=int, default=300_000, help="size of heldout_sample.txt")
    ap.add_argument("--sample-doc-cap", type=int, default=12_000, help="max characters taken from one held-out doc")
    args = ap.parse_args()
    work = args.work.resolve()
    versions = fetch(work)
    out = work / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    seen = set()
    heldout_docs = []
    with open(out / "train.txt", "w", encoding="utf-8") as ftr, open(out / "heldout.txt", "w", encoding="utf-8") as fho:
        for name, fn in EXTRACT.items():
            docs = fn(work)
            st = {"packages": {p: versions[p] for p in SOURCES[name][0]}, "license": SOURCES[name][1],
                  "what": SOURCES[name][2], "docs": 0, "bytes": 0, "heldout_docs": 0, "heldout_bytes": 0,
                  "duplicates_dropped": 0}
            for did, text in docs:
                text = text.replace(RS, "")
                if len(text) < 10:
                    continue
                h = hashlib.sha256(text.encode()).digest()
                if h in seen:
                    st["duplicates_dropped"] += 1
                    continue
                seen.add(h)
                nb = len(text.encode())
                if is_heldout(name, did):
                    fho.write(text + "\n" + RS + "\n")
                    st["heldout_docs"] += 1
                    st["heldout_bytes"] += nb
                    heldout_docs.append((hashlib.sha256(f"sample/{name}/{did}".encode()).hexdigest(), name, text))
                else:
                    ftr.write(text + "\n" + RS + "\n")
                    st["docs"] += 1
                    st["bytes"] += nb
            stats[name] = st
            print(f"{name:22s} docs {st['docs']:7d}  {st['bytes'] / 1e6:8.2f} MB   held-out {st['heldout_docs']:5d} "
                  f"{st['heldout_bytes'] / 1e6:6.2f} MB  dup {st['duplicates_dropped']}", flush=True)
    # held-out sample: documents in hash order, each capped (cut at a paragraph), until the size is reached
    heldout_docs.sort()
    parts, total = [], 0
    for _, name, text in heldout_docs:
        if len(text) > args.sample_doc_cap:
            cut = text.rfind("\n\n", 0, args.sample_doc_cap)
            text = text[:cut if cut > args.sample_doc_cap // 2 else args.sample_doc_cap]
        parts.append(text)
        total += len(text.encode()) + 2
        if total >= args.sample_bytes:
            break
    (out / "heldout_sample.txt").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    tot = {k: sum(s[k] for s in stats.values()) for k in ("docs", "bytes", "heldout_docs", "heldout_bytes")}
    print("total", tot, "sample bytes", total)
    (out / "sources.json").write_text(json.dumps({"sources": stats, "total": tot}, indent=1) + "\n")


if __name__ == "__main__":
    main()
