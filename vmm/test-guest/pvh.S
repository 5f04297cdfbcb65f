/*
 * PVH entry: 32-bit protected mode, paging off, %ebx = hvm_start_info.
 * Builds identity page tables for the low 4 GiB (2 MiB pages), enters long
 * mode and calls guest_main(start_info->cmdline_paddr).
 */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4				/* name size: "Xen\0" */
	.long 4				/* descriptor size */
	.long 18			/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_start
	.balign 4

	.section .text.entry, "ax"
	.code32
	.globl pvh_start
pvh_start:
	mov $0x3f8, %dx
	mov $'@', %al
	out %al, %dx			/* first instructions: mark the console */
	mov %ebx, %esi

	mov $pdpt, %eax
	or $3, %eax
	mov %eax, pml4
	mov $pdpt, %edi
	mov $pd, %eax
	or $3, %eax
	mov $4, %ecx
1:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x1000, %eax
	add $8, %edi
	loop 1b
	mov $pd, %edi
	mov $0x83, %eax			/* present, writable, 2 MiB page */
	mov $2048, %ecx
2:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x200000, %eax
	add $8, %edi
	loop 2b

	mov %cr4, %eax
	or $0x20, %eax			/* PAE */
	mov %eax, %cr4
	mov $pml4, %eax
	mov %eax, %cr3
	mov $0xc0000080, %ecx		/* EFER */
	rdmsr
	or $0x100, %eax			/* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax		/* PG | PE */
	mov %eax, %cr0
	lgdt gdt_desc
	ljmp $0x08, $long_mode

	.code64
long_mode:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov %ax, %fs
	mov %ax, %gs
	mov $stack_top, %rsp
	mov %esi, %esi
	mov 24(%rsi), %rdi		/* hvm_start_info.cmdline_paddr */
	call guest_main
3:	cli
	hlt
	jmp 3b

	.section .rodata
	.balign 8
gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* 64-bit code */
	.quad 0x00cf92000000ffff	/* data */
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

	.section .bss
	.balign 4096
pml4:	.skip 4096
pdpt:	.skip 4096
pd:	.skip 4 * 4096
