// placeholder: implemented in its own change
#include "../common.h"
