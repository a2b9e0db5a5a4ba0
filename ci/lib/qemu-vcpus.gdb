# Prints QEMU's own state of each vCPU of a running qemu-system-x86_64 (7.2, with its
# symbols), one line each: used by ci/testhost-run (gdb -p PID -batch -x this) as evidence
# when an L1 CPU stops. A halted vCPU wakes when cs->interrupt_request has a bit it can act
# on; env.hflags2 holds SVM's GIF (0x1; 0 blocks every interrupt), HIF (0x2, the host's IF
# at VMRUN), NMI (0x4) and VINTR (0x8: while a guest runs with V_INTR_MASKING, HIF gates
# the host's interrupts); int_ctl is the guest's V_INTR state. Then each vCPU's last
# changes of GIF (ci/patches/qemu-7.2-svm-trace-gif.patch), "what" named from the
# patch's codes: 1 clgi, 2 stgi, 3 vmrun, 4 vmexit, 5 reset.
set pagination off
set $c = cpus.tqh_first
while $c
  printf "cpu%d halted=%d interrupt_request=0x%x exception_index=%d stop=%d stopped=%d exit_request=%d hflags=0x%x hflags2=0x%x eflags=0x%x int_ctl=0x%x\n", $c->cpu_index, $c->halted, $c->interrupt_request, $c->exception_index, $c->stop, $c->stopped, $c->exit_request, ((X86CPU*)$c)->env.hflags, ((X86CPU*)$c)->env.hflags2, ((X86CPU*)$c)->env.eflags, ((X86CPU*)$c)->env.int_ctl
  set $c = $c->node.tqe_next
end
set $c = cpus.tqh_first
while $c
  set $e = &((X86CPU*)$c)->env
  set $j = $e->gif_seq > 8 ? $e->gif_seq - 8 : 0
  while $j < $e->gif_seq
    set $g = &$e->gif_log[$j % 8]
    printf "cpu%d gif seq=%lu what=", $c->cpu_index, $g->seq
    if $g->what == 1
      printf "clgi"
    end
    if $g->what == 2
      printf "stgi"
    end
    if $g->what == 3
      printf "vmrun"
    end
    if $g->what == 4
      printf "vmexit"
    end
    if $g->what == 5
      printf "reset"
    end
    if $g->what < 1 || $g->what > 5
      printf "%u", $g->what
    end
    printf " rip=0x%lx rip2=0x%lx hflags=0x%x hflags2=0x%x info=0x%x ns=%ld\n", $g->rip, $g->rip2, $g->hflags, $g->hflags2, $g->info, $g->ns
    set $j = $j + 1
  end
  set $c = $c->node.tqe_next
end
