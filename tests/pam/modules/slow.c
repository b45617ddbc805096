/* A PAM module that spends `ms=N` milliseconds (default 20) in authentication and then lets the
 * next module decide, like a stack that spends its time hashing. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <security/pam_modules.h>

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    long ms = 20;
    (void)pamh; (void)flags;
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "ms=", 3) == 0)
            ms = atol(argv[i] + 3);
    struct timespec left = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&left, &left) != 0 && errno == EINTR)
        ;
    return PAM_IGNORE;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv)
{
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_IGNORE;
}
