/* svm-intr-once.S: does this QEMU deliver an SVM-injected interrupt exactly once?
 *
 * A multiboot kernel for QEMU's TCG that acts as a hypervisor (L1): it runs a tiny
 * flat 32-bit guest (L2) with VMRUN and EVENTINJ = an external interrupt (vector 0x40).
 * L2's handler records each entry's saved EIP and EFLAGS, spins for a while with IF=0
 * and leaves with VMMCALL. A CPU enters the handler once per VMRUN. QEMU 7.2 to 10.0
 * deliver it a second time, inside the handler with IF=0, when the vCPU thread is kicked
 * before the next exit (here: PIT interrupts that L1, running with IF=0, cannot take);
 * ci/patches/qemu-7.2-svm-injected-intr-once.patch fixes that. Output on the debug
 * console (port 0xe9), one line per iteration and a last line
 * "done; iterations with !=1 handler entries: N" (hex); exit status through
 * isa-debug-exit at 0xf4: (N << 1) | 1. Built and run by ci/testhost-svm-probe.
 */
/* Minimal nested-SVM probe: L1 (this kernel) injects EVENTINJ=INTR vector 0x40
 * into an L2 that runs flat 32-bit protected mode. The L2 handler counts its
 * entries, spins with IF=0 for a while, then VMMCALLs back to L1.
 * On correct hardware the handler is entered exactly once per VMRUN. */
/* MASKPIC=1 masks the 8259, so nothing kicks the vCPU (the replay then needs another
 * kick source, e.g. -accel tcg,thread=single with 2 vCPUs). */
.ifndef MASKPIC
.set MASKPIC, 0
.endif
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x0
.section .multiboot, "a"
.align 4
.long MB_MAGIC, MB_FLAGS, -(MB_MAGIC+MB_FLAGS)

.set ITERS, 6
.set VEC, 0x40

.text
.code32
.globl _start
_start:
    cli
    mov $stack_top, %esp
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds; mov %ax, %es; mov %ax, %ss; mov %ax, %fs; mov %ax, %gs
    mov $0xC0000080, %ecx; rdmsr; or $0x1000, %eax; wrmsr      /* EFER.SVME */
    mov $0xC0010117, %ecx; mov $hsave, %eax; xor %edx, %edx; wrmsr /* VM_HSAVE_PA */
    /* L2 IDT gate for VEC -> l2_handler (32-bit interrupt gate) */
    mov $l2_handler, %eax
    mov %ax, l2_idt + VEC*8
    movw $0x08, l2_idt + VEC*8 + 2
    movw $0x8E00, l2_idt + VEC*8 + 4
    shr $16, %eax
    mov %ax, l2_idt + VEC*8 + 6
    cmpl $0, maskpic
    je 10f
    mov $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
10: mov $msg_start, %esi; call puts
    movl $0, iter
    movl $0, bad
iter_loop:
    call setup_vmcb
    movl $0, counter
    pusha
    mov $vmcb, %eax
    vmrun
    popa
    mov $msg_iter, %esi; call puts
    mov iter, %eax; call puthex
    mov $msg_exit, %esi; call puts
    mov vmcb+0x70, %eax; call puthex
    mov $msg_cnt, %esi; call puts
    mov counter, %eax; call puthex
    mov $msg_eii, %esi; call puts
    mov vmcb+0x88, %eax; call puthex
    mov $msg_e0, %esi; call puts
    mov eips, %eax; call puthex
    mov $msg_f, %esi; call puts
    mov efls, %eax; call puthex
    cmpl $2, counter
    jb 9f
    mov $msg_e1, %esi; call puts
    mov eips+4, %eax; call puthex
    mov $msg_f, %esi; call puts
    mov efls+4, %eax; call puthex
9:  mov $msg_nl, %esi; call puts
    cmpl $1, counter
    je 2f
    incl bad
2:  incl iter
    cmpl $ITERS, iter
    jb iter_loop
    mov $msg_done, %esi; call puts
    mov bad, %eax; call puthex
    mov $msg_nl, %esi; call puts
    mov bad, %eax
    mov $0xf4, %dx
    outl %eax, %dx          /* isa-debug-exit: exit status = (bad<<1)|1 */
3:  hlt
    jmp 3b

setup_vmcb:
    pusha
    mov $vmcb, %edi; xor %eax, %eax; mov $1024, %ecx; rep stosl
    movl $0x01000001, vmcb+0x0C      /* intercept INTR(bit0), HLT(bit24) */
    movl $0x00000003, vmcb+0x10      /* intercept VMRUN(bit32), VMMCALL(bit33) */
    movl $1, vmcb+0x58               /* ASID */
    movl $0x01000000, vmcb+0x60      /* int_ctl: V_INTR_MASKING */
    movl $(0x80000000 | VEC), vmcb+0xA8  /* EVENTINJ: valid, type INTR */
    /* save area at 0x400: es cs ss ds (16 bytes each) */
    movw $0x10, vmcb+0x400; movw $0xC93, vmcb+0x402; movl $0xffffffff, vmcb+0x404
    movw $0x08, vmcb+0x410; movw $0xC9B, vmcb+0x412; movl $0xffffffff, vmcb+0x414
    movw $0x10, vmcb+0x420; movw $0xC93, vmcb+0x422; movl $0xffffffff, vmcb+0x424
    movw $0x10, vmcb+0x430; movw $0xC93, vmcb+0x432; movl $0xffffffff, vmcb+0x434
    /* gdtr 0x460, idtr 0x480 */
    movl $(gdt_end-gdt-1), vmcb+0x464; movl $gdt, vmcb+0x468
    movl $(256*8-1), vmcb+0x484; movl $l2_idt, vmcb+0x488
    movl $0x1000, vmcb+0x4D0         /* EFER.SVME */
    movl $0x11, vmcb+0x558           /* CR0 = PE|ET */
    movl $0x400, vmcb+0x560          /* DR7 */
    movl $0xffff0ff0, vmcb+0x568     /* DR6 */
    movl $0x202, vmcb+0x570          /* RFLAGS: IF=1 */
    movl $l2_entry, vmcb+0x578       /* RIP */
    movl $l2_stack_top, vmcb+0x5D8   /* RSP */
    popa
    ret

/* ---- L2 code ---- */
l2_entry:
    jmp l2_entry              /* never reached before the injected interrupt */
l2_handler:
    mov counter, %ebx
    and $3, %ebx
    mov (%esp), %eax
    mov %eax, eips(,%ebx,4)
    mov 8(%esp), %eax
    mov %eax, efls(,%ebx,4)
    incl counter
    mov spin, %ecx
4:  dec %ecx
    jnz 4b
    vmmcall                   /* intercepted: back to L1 */
5:  jmp 5b

/* ---- debugcon output (port 0xe9) ---- */
puts:
    push %eax; push %edx
    mov $0xe9, %dx
6:  lodsb
    test %al, %al
    jz 7f
    outb %al, %dx
    jmp 6b
7:  pop %edx; pop %eax
    ret
puthex:
    push %ecx; push %edx; push %eax
    mov $8, %ecx
8:  rol $4, %eax
    push %eax
    and $0xf, %eax
    mov hexdig(%eax), %al
    mov $0xe9, %dx
    outb %al, %dx
    pop %eax
    loop 8b
    pop %eax; pop %edx; pop %ecx
    ret

.data
.align 8
gdt:
    .quad 0
    .quad 0x00CF9B000000FFFF   /* 0x08 code */
    .quad 0x00CF93000000FFFF   /* 0x10 data */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
hexdig: .ascii "0123456789abcdef"
msg_start: .asciz "svm-probe start\n"
msg_iter: .asciz "iter "
msg_exit: .asciz " exitcode "
msg_cnt: .asciz " handler_entries "
msg_eii: .asciz " exit_int_info "
msg_nl: .asciz "\n"
msg_e0: .asciz "\n   entry0 frame eip "
msg_e1: .asciz " | entry1 frame eip "
msg_f: .asciz " eflags "
eips: .long 0,0,0,0
efls: .long 0,0,0,0
msg_done: .asciz "done; iterations with !=1 handler entries: "
.align 4
counter: .long 0
iter: .long 0
bad: .long 0
.globl maskpic
maskpic: .long MASKPIC
.globl spin
spin: .long 200000000

.bss
.align 4096
vmcb: .space 4096
hsave: .space 4096
l2_idt: .space 4096
.space 16384
stack_top:
.space 16384
l2_stack_top:
