/* 64-bit entry (Linux 64-bit boot protocol: long mode, %rsi = zero page). */
	.section .text.entry, "ax"
	.code64
	.globl start64
start64:
	mov $0x3f8, %dx
	mov $'@', %al
	out %al, %dx			/* first instructions: mark the console */
	mov $stack_top, %rsp
	mov 0x228(%rsi), %edi		/* boot_params.hdr.cmd_line_ptr */
	call guest_main
1:	cli
	hlt
	jmp 1b
