"""The loops of a kernel's SASS, largest first, with their opcode mix: how
many instructions a tile costs, and of what kind (a compile check on the CPU
machine; what runs faster is the GPU's to say).

    SASS=1 bash scripts/ptx_check.sh csrc/cuda/attention_mma.cu sm_90a
    python3 scripts/sass_loops.py /tmp/ptx_check/attention_mma.sm_90a.sass 'mma_forward_kernel.*Li80E'

A loop is a backward branch (BRA to a lower address) and everything between
its target and it; nested loops show as overlapping ranges.
"""
import collections
import re
import sys


def kernels(sass_text):
    """(mangled name, [(address, instruction text)]) per function."""
    for chunk in re.split(r"\n\s*Function : ", sass_text)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        code = [(int(m.group(1), 16), m.group(2).strip())
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", chunk)]
        yield name, code


def opcode(text):
    """The opcode without its predicate and modifiers: '@P0 LOP3.LUT ...' -> LOP3."""
    words = text.split()
    word = words[1] if words[0].startswith("@") else words[0]
    return word.split(".")[0]


def main(path, pattern, shown=3):
    for name, code in kernels(open(path).read()):
        if not re.search(pattern, name):
            continue
        index = {address: i for i, (address, _) in enumerate(code)}
        loops = []
        for i, (address, text) in enumerate(code):
            target = re.search(r"BRA.*0x([0-9a-f]+)", text)
            if target and int(target.group(1), 16) < address and int(target.group(1), 16) in index:
                loops.append((index[int(target.group(1), 16)], i))
        print(f"{name[:120]}: {len(code)} instructions")
        for start, end in sorted(loops, key=lambda loop: loop[0] - loop[1])[:shown]:
            mix = collections.Counter(opcode(text) for _, text in code[start:end + 1])
            print(f"  loop {start}-{end}: {end - start + 1} instructions; "
                  + ", ".join(f"{op} {n}" for op, n in mix.most_common(10)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
