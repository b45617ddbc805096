/* A PAM module whose authentication dereferences NULL: the worker dies with SIGSEGV. */
#include <security/pam_modules.h>

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    volatile int *nowhere = 0;
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return *nowhere;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
