	.section .bss
	.balign 16
	.skip 16384
	.globl stack_top
stack_top:
