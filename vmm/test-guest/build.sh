#!/bin/sh
# Builds the milk-vmm test guest in two flavours into OUTDIR (default: .):
#   milk-test-guest-pvh.elf  ELF with a PVH note (32-bit entry, switches to long mode)
#   milk-test-guest-64.elf   ELF without PVH note (entered in long mode at e_entry)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-.}
mkdir -p "$out"
CC=${CC:-gcc}
CFLAGS="-O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -mno-red-zone \
 -mgeneral-regs-only -fno-asynchronous-unwind-tables -nostdlib -Wall -Wextra -Werror"
$CC $CFLAGS -I"$here/../../virtio-milk/include" -c "$here/guest.c" -o "$out/guest.o"
$CC -c "$here/entry64.S" -o "$out/entry64.o"
$CC -c "$here/pvh.S" -o "$out/pvh.o"
$CC -c "$here/stack.S" -o "$out/stack.o"
ld -static -nostdlib -no-pie -z noexecstack --no-warn-rwx-segments -T "$here/link.ld" -e pvh_start \
   -o "$out/milk-test-guest-pvh.elf" "$out/pvh.o" "$out/guest.o" "$out/stack.o"
ld -static -nostdlib -no-pie -z noexecstack --no-warn-rwx-segments -T "$here/link.ld" -e start64 \
   -o "$out/milk-test-guest-64.elf" "$out/entry64.o" "$out/guest.o" "$out/stack.o"
