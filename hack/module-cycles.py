#!/usr/bin/env python3
"""Reports import cycles between the modules of each crate.

A module is a source file (`a/b.rs` or `a/b/mod.rs` is `a::b`). An edge
A -> B is a path in A's non-test code (`use crate::…`, `use super::…`,
`use self::…`, or an inline `crate::…`/`super::…` path) that names an item
of B; a re-export (`pub use x::Y`) is followed to the module that defines
`Y`, so a parent that re-exports its children is not itself a dependency.
Test modules (`#[cfg(test)] mod tests` and `tests.rs` files) are left out:
they may look anywhere. Exit status 1 when a cycle exists.

Usage: hack/module-cycles.py [CRATE_SRC_DIR ...]  (default: every */src)
"""
import pathlib
import re
import sys


def module_of(src, path):
    rel = path.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def strip_tests(text):
    # Drop `#[cfg(test)]` items (a test module runs to the end of its braces).
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\([^)]*\))?\s+)?mod\s+\w+\s*(;|\{)", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        if m.group(3) == ";":
            i = m.end()
            continue
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    text = "".join(out)
    text = re.sub(r"//[^\n]*", "", text)
    return text


def expand_use(body):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    body = re.sub(r"\s+", "", body)
    depth, parts, cur = 0, [], ""
    # Split top-level commas.
    def split(s):
        depth, out, cur = 0, [], ""
        for ch in s:
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                out.append(cur)
                cur = ""
            else:
                cur += ch
        if cur:
            out.append(cur)
        return out

    def go(s):
        i = s.find("{")
        if i < 0:
            return [re.sub(r"as\w+$", "", s.split(" as ")[0])]
        prefix, inner = s[:i], s[i + 1 : s.rfind("}")]
        res = []
        for p in split(inner):
            for q in go(p):
                res.append(prefix + q if q != "self" else prefix.rstrip(":"))
        return res

    return [p for part in split(body) for p in go(part)]


def analyse(src):
    files = [p for p in src.rglob("*.rs") if p.name != "tests.rs"]
    mods, uses, reexports = {}, {}, {}
    for f in files:
        m = module_of(src, f)
        if f.name == "main.rs" and (src / "lib.rs").exists():
            m = ("<main>",)
        text = strip_tests(f.read_text())
        mods[m] = f
        paths = []
        reexp = {}
        for u in re.finditer(r"(pub(\([^)]*\))?\s+)?use\s+([^;]+);", text):
            for p in expand_use(u.group(3)):
                if not u.group(1):
                    paths.append(p)
                else:
                    name = p.split("::")[-1]
                    reexp[name] = p
        for p in re.finditer(r"(?<![\w:])((?:crate|super|self)(?:::\w+)+)", text):
            paths.append(p.group(1))
        uses[m] = paths
        reexports[m] = reexp
    return mods, uses, reexports


def absolute(mod, path):
    segs = path.split("::")
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] in ("super", "self"):
        base = list(mod)
        while segs and segs[0] in ("super", "self"):
            if segs[0] == "super":
                base = base[:-1]
            segs = segs[1:]
    else:
        # `use x::…` of a child module declared here, or an external crate.
        if tuple(list(mod) + [segs[0]]) in MODS:
            base = list(mod)
        elif (segs[0],) in MODS and mod == ():
            base = []
        else:
            return None
    return base + segs


def resolve(segs, seen=()):
    cur = []
    for i, s in enumerate(segs):
        if tuple(cur + [s]) in MODS:
            cur.append(s)
            continue
        re_ = REEXPORTS.get(tuple(cur), {}).get(s)
        if re_ and (tuple(cur), s) not in seen:
            target = absolute(tuple(cur), re_)
            if target:
                return resolve(target + segs[i + 1 :], seen + ((tuple(cur), s),))
        break
    return tuple(cur)


def cycles(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            strong(v)
    return out


def name(m):
    return "::".join(m) or "crate"


status = 0
roots = [pathlib.Path(a) for a in sys.argv[1:]] or sorted(
    p for p in pathlib.Path(".").glob("**/src") if "target" not in p.parts and (p.parent / "Cargo.toml").exists()
)
for src in roots:
    MODS, USES, REEXPORTS = analyse(src)
    graph = {}
    for m, paths in USES.items():
        for p in paths:
            segs = absolute(m, p)
            if segs is None:
                continue
            t = resolve(segs)
            if t != m and t in MODS:
                graph.setdefault(m, set()).add(t)
    found = cycles(graph)
    for comp in found:
        status = 1
        edges = [f"{name(a)} -> {name(b)}" for a in comp for b in sorted(graph.get(a, ())) if b in comp]
        print(f"{src}: cycle between {', '.join(sorted(map(name, comp)))}: {'; '.join(edges)}")
    if not found:
        print(f"{src}: no cycle ({len(MODS)} modules)")
sys.exit(status)
