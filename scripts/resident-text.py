#!/usr/bin/env python3
"""Which crates' code a running server keeps resident.

Usage: scripts/resident-text.py PID  (needs read access to /proc/PID/pagemap)

Reads the present bit of each page of the process's executable mappings and
attributes the resident text pages to crates by the symbols (`nm`) they hold.
"""
import bisect, collections, os, re, struct, subprocess, sys

if len(sys.argv) != 2 or not sys.argv[1].isdigit():
    sys.exit("usage: scripts/resident-text.py PID")
pid = int(sys.argv[1])
if not os.path.exists(f"/proc/{pid}/maps"):
    sys.exit(f"resident-text: no process {pid}")
binary = os.path.realpath(f"/proc/{pid}/exe")
mappings = []
for line in open(f"/proc/{pid}/maps"):
    fields = line.split()
    if len(fields) >= 6 and os.path.realpath(fields[5]) == binary:
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        mappings.append((lo, hi, fields[1], int(fields[2], 16)))

resident_text = []  # file offsets of resident pages of executable mappings
with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
    for lo, hi, perms, offset in mappings:
        pages = (hi - lo) // 4096
        pagemap.seek(lo // 4096 * 8)
        entries = pagemap.read(pages * 8)
        present = [i for i in range(pages) if struct.unpack_from("<Q", entries, i * 8)[0] >> 63]
        print(f"mapping {perms} {(hi - lo) // 1024:>8} KB, resident {len(present) * 4:>8} KB")
        if "x" in perms:
            resident_text += [offset + i * 4096 for i in present]

segments = []  # (file offset, virtual address, file size) of LOAD segments
for line in subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True).stdout.splitlines():
    fields = line.split()
    if fields and fields[0] == "LOAD":
        segments.append((int(fields[1], 16), int(fields[2], 16), int(fields[4], 16)))


def file_offset(vaddr):
    for offset, start, size in segments:
        if start <= vaddr < start + size:
            return vaddr - start + offset
    return None


def crate(symbol):
    symbol = re.sub(r"^(<|impl |dyn )+", "", symbol)
    match = re.match(r"[A-Za-z_][A-Za-z0-9_]*", symbol)
    return match.group(0) if match else "?"


symbols = []  # (file offset, size, crate)
nm = subprocess.run(["nm", "-C", "--defined-only", "-S", binary], capture_output=True, text=True).stdout
for line in nm.splitlines():
    fields = line.split(" ", 3)
    if len(fields) == 4 and fields[2] in "tTwW":
        offset = file_offset(int(fields[0], 16))
        if offset is not None and int(fields[1], 16) > 0:
            symbols.append((offset, int(fields[1], 16), crate(fields[3])))
if not symbols:
    sys.exit(f"resident-text: {binary} has no symbols (stripped?)")
symbols.sort()
starts = [s[0] for s in symbols]
largest = max((s[1] for s in symbols), default=0)

size_of = collections.Counter()
for _, size, name in symbols:
    size_of[name] += size
resident = collections.Counter()
for page in resident_text:
    shares = collections.Counter()
    j = bisect.bisect_right(starts, page + 4095) - 1
    while j >= 0 and symbols[j][0] + largest > page:
        start, size, name = symbols[j]
        overlap = min(start + size, page + 4096) - max(start, page)
        if overlap > 0:
            shares[name] += overlap
        j -= 1
    total = sum(shares.values())
    if not total:
        resident["(no symbol)"] += 4
    for name, part in shares.items():
        resident[name] += 4 * part / total

print(f"resident text: {len(resident_text) * 4} KB")
print(f"{'crate':<28}{'resident KB':>12}{'code KB':>10}")
for name, kb in resident.most_common(int(os.environ.get("TOP", "30"))):
    print(f"{name:<28}{kb:>12.0f}{size_of[name] / 1024:>10.0f}")
