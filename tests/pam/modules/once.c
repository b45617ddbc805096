/* A PAM module with state in a static variable, as some modules keep: it succeeds on its first
 * call after being loaded and refuses every later one. Shows what keeping modules loaded
 * between logins (authd.pam.modulepins) changes for such a module. */
#include <security/pam_modules.h>

static int calls;

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return calls++ == 0 ? PAM_SUCCESS : PAM_AUTH_ERR;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}
